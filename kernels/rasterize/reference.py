"""The portable PyTorch rasterizer: the specification every backend is tested against.

Conventions (the same as nvdiffrast, so its output can be used interchangeably):

- Input: homogeneous clip-space vertices (B, V, 4), OpenGL clip space (NDC in [-1, 1]^3).
- Output ``rast`` (B, H, W, 4) = (u, v, z/w, triangle_id + 1), 0 everywhere for empty
  pixels. (u, v) are the perspective-correct barycentric weights of the triangle's
  vertices 0 and 1; vertex 2 gets 1 - u - v. z/w is the NDC depth, in [-1, 1].
- Pixel (row i, column j) has its centre at NDC x = (2j + 1)/W - 1, y = 1 - (2i + 1)/H:
  row 0 is the TOP of the image, as in `engine_server.cameras.camera_rays`
  (nvdiffrast's row 0 is the bottom; its adapter flips clip y to match).
- A pixel is covered by a triangle when its centre lies inside or on the triangle's
  edges; the nearest (smallest z/w) covering triangle wins, ties go to the smaller
  triangle id. Both windings are drawn (no back-face culling).
- No near-plane clipping: a triangle with a vertex at w <= 0 (at or behind the camera
  plane) is dropped, and fragments with z/w outside [-1, 1] are discarded.

Gradients: the coverage and visibility decision is discrete and carries none; the
winning triangle's barycentrics (and z/w) are recomputed differentiably from the
clip-space vertices, so `interpolate` passes gradients to both attributes and vertex
positions for covered pixels. Silhouette gradients need `antialias_torch`.

Algorithm: per-triangle pixel bounding boxes are enumerated as flat candidate
(triangle, pixel) lists (in chunks that bound memory), tested with 2D homogeneous
edge functions (Olano and Greer 1997), and resolved with one `scatter_reduce(amin)` on
a 64-bit key (sortable depth bits, triangle id) per pixel.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

MAX_CANDIDATES = 1 << 22
"""Most (triangle, pixel) candidates tested at once; bounds peak memory at a few hundred MB."""

_EMPTY_KEY = torch.iinfo(torch.int64).max
_LOW32 = 0xFFFFFFFF


def pixel_centres_ndc(size: int, flip: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """NDC coordinate of pixel centres along one axis, (size,); flip=True for rows (row 0 at +1)."""
    c = (2.0 * torch.arange(size, device=device, dtype=dtype) + 1.0) / size - 1.0
    return -c if flip else c


def _sortable_depth(z: torch.Tensor) -> torch.Tensor:
    """float32 depths -> int64 whose signed order is the float order (for packing with an id)."""
    bits = z.to(torch.float32).contiguous().view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.to(torch.int64)


def _edge_setup(xyw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2D homogeneous edge functions. xyw: (..., 3, 3) rows are vertices (x, y, w).

    Returns e (..., 3, 3) with e_i = c_j x c_k (the rows of adj(M) for M = [c_0 c_1 c_2]),
    so that e_i . (sx, sy, 1) is proportional to the perspective-correct barycentric of
    vertex i at NDC point (sx, sy), and det (...,) = det(M).
    """
    c0, c1, c2 = xyw.unbind(-2)
    e = torch.stack([torch.linalg.cross(c1, c2), torch.linalg.cross(c2, c0), torch.linalg.cross(c0, c1)], dim=-2)
    det = (c0 * e[..., 0, :]).sum(-1)
    return e, det


def _candidate_depth_keys(
    clip: torch.Tensor, faces: torch.Tensor, height: int, width: int, max_candidates: int
) -> torch.Tensor:
    """Nearest-triangle key per pixel, (B*H*W,) int64: (sortable depth << 32) | triangle id, or empty."""
    B = clip.shape[0]
    F = faces.shape[0]
    dev = clip.device
    tri = clip[:, faces]  # (B, F, 3, 4)
    w = tri[..., 3]
    xyw = tri[..., (0, 1, 3)]
    e, det = _edge_setup(xyw)  # (B, F, 3, 3), (B, F)
    scale = xyw.abs().amax(dim=(-1, -2)) ** 3
    valid = (w > 0).all(-1) & (det.abs() > 1e-12 * scale) & torch.isfinite(det)
    sign = torch.where(det < 0, -1.0, 1.0).to(e.dtype)
    e = e * sign[..., None, None]  # inside <=> every e_i . p >= 0
    # z/w is affine in NDC: z_ndc(p) = q . p with q = sum_i z_i e_i / det.
    safe_det = torch.where(valid, det, torch.ones_like(det))
    q = (tri[..., 2, None] * e).sum(-2) * sign[..., None] / safe_det[..., None]  # (B, F, 3)

    # Pixel bounding boxes (continuous pixel coordinates, centres at integers).
    safe_w = torch.where(valid[..., None], w, torch.ones_like(w))
    px = (tri[..., 0] / safe_w + 1.0) * (0.5 * width) - 0.5
    py = (1.0 - tri[..., 1] / safe_w) * (0.5 * height) - 0.5
    tol = 1e-4
    x0 = torch.ceil(px.amin(-1).clamp(-1.0, width) - tol).long().clamp(0, width)
    x1 = torch.floor(px.amax(-1).clamp(-1.0, width) + tol).long().clamp(-1, width - 1)
    y0 = torch.ceil(py.amin(-1).clamp(-1.0, height) - tol).long().clamp(0, height)
    y1 = torch.floor(py.amax(-1).clamp(-1.0, height) + tol).long().clamp(-1, height - 1)
    bw = (x1 - x0 + 1).clamp_min(0)
    bh = (y1 - y0 + 1).clamp_min(0)
    counts = (bw * bh * valid).reshape(-1)  # (B*F,)

    e, q = e.reshape(B * F, 3, 3), q.reshape(B * F, 3)
    x0, y0, bw = x0.reshape(-1), y0.reshape(-1), bw.reshape(-1)
    sx_all = pixel_centres_ndc(width, False, dev, clip.dtype)
    sy_all = pixel_centres_ndc(height, True, dev, clip.dtype)
    keys = torch.full((B * height * width,), _EMPTY_KEY, dtype=torch.int64, device=dev)

    # Chunks of whole triangles with at most max_candidates candidates (one triangle may exceed it alone).
    ends = torch.cumsum(counts, 0)
    total = int(ends[-1]) if ends.numel() else 0
    if total == 0:
        return keys
    bounds = [0]
    if total > max_candidates:
        cuts = torch.arange(max_candidates, total, max_candidates, device=dev)
        bounds += torch.searchsorted(ends, cuts, right=True).tolist()
    bounds.append(B * F)
    bounds = sorted(set(bounds))
    for s, t in zip(bounds[:-1], bounds[1:]):
        cnt = counts[s:t]
        n = int(cnt.sum())
        if n == 0:
            continue
        local_face = torch.repeat_interleave(torch.arange(t - s, device=dev), cnt)  # (N,)
        starts = torch.cumsum(cnt, 0) - cnt
        offset = torch.arange(n, device=dev) - starts[local_face]
        owner = local_face + s
        wbox = bw[owner]
        col = x0[owner] + offset % wbox
        row = y0[owner] + torch.div(offset, wbox, rounding_mode="floor")
        sx, sy = sx_all[col], sy_all[row]
        eo = e[owner]  # (N, 3, 3)
        bary = eo[..., 0] * sx[:, None] + eo[..., 1] * sy[:, None] + eo[..., 2]  # (N, 3), unnormalised
        qo = q[owner]
        z = qo[:, 0] * sx + qo[:, 1] * sy + qo[:, 2]
        hit = (bary >= 0).all(-1) & (z >= -1.0) & (z <= 1.0)
        if not bool(hit.any()):
            continue
        owner, row, col, z = owner[hit], row[hit], col[hit], z[hit]
        batch = torch.div(owner, F, rounding_mode="floor")
        pixel = (batch * height + row) * width + col
        key = (_sortable_depth(z) << 32) | (owner - batch * F)
        keys.scatter_reduce_(0, pixel, key, reduce="amin", include_self=True)
    return keys


def rasterize_torch(
    clip: torch.Tensor, faces: torch.Tensor, resolution: tuple[int, int], max_candidates: int = MAX_CANDIDATES
) -> torch.Tensor:
    """Rasterize triangles. clip: (B, V, 4) float; faces: (F, 3) long, valid indices. Returns (B, H, W, 4)."""
    height, width = resolution
    B = clip.shape[0]
    dev, dt = clip.device, clip.dtype
    if faces.shape[0] == 0 or clip.shape[1] == 0:
        return torch.zeros(B, height, width, 4, device=dev, dtype=dt)
    with torch.no_grad():
        keys = _candidate_depth_keys(clip.detach(), faces, height, width, max_candidates)
        pix = (keys != _EMPTY_KEY).nonzero().squeeze(1)  # covered pixels (N,)
        fid = keys[pix] & _LOW32
        batch = torch.div(pix, height * width, rounding_mode="floor")
        rem = pix - batch * (height * width)
        row = torch.div(rem, width, rounding_mode="floor")
        col = rem - row * width
        p = torch.stack(
            [pixel_centres_ndc(width, False, dev, dt)[col], pixel_centres_ndc(height, True, dev, dt)[row]], -1
        )
        p = torch.cat([p, torch.ones_like(p[:, :1])], -1)  # (N, 3)
    # Differentiable part: barycentrics of the winning triangle at each covered pixel centre.
    c = clip[batch[:, None], faces[fid]]  # (N, 3, 4)
    e, _ = _edge_setup(c[..., (0, 1, 3)])
    bary = (e * p[:, None, :]).sum(-1)  # (N, 3), unnormalised; the sum has det's sign and is non-zero
    bary = bary / bary.sum(-1, keepdim=True)
    zw = (bary * c[..., 2]).sum(-1) / (bary * c[..., 3]).sum(-1)
    vals = torch.stack([bary[:, 0], bary[:, 1], zw, (fid + 1).to(dt)], dim=-1)
    rast = torch.zeros(B * height * width, 4, device=dev, dtype=dt).index_put((pix,), vals)
    return rast.view(B, height, width, 4)


def _covered(rast: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of covered pixels (N,) and their triangle ids (N,) from rast (B, H, W, 4)."""
    tri = rast[..., 3].detach().reshape(-1).round().long() - 1
    pix = (tri >= 0).nonzero().squeeze(1)
    return pix, tri[pix]


def interpolate_torch(attr: torch.Tensor, rast: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Interpolate vertex attributes. attr: (B or 1, V, C); rast: (B, H, W, 4); faces (F, 3) long.

    Returns (B, H, W, C), zero on empty pixels; differentiable w.r.t. attr and rast's (u, v).
    """
    B, H, W, _ = rast.shape
    C = attr.shape[-1]
    pix, fid = _covered(rast)
    vid = faces[fid]  # (N, 3)
    if attr.shape[0] == 1:
        a = attr[0][vid]  # (N, 3, C)
    else:
        a = attr[torch.div(pix, H * W, rounding_mode="floor")[:, None], vid]
    r = rast.reshape(-1, 4)[pix]
    u, v = r[:, 0:1].to(a.dtype), r[:, 1:2].to(a.dtype)
    vals = u * a[:, 0] + v * a[:, 1] + (1.0 - u - v) * a[:, 2]
    out = torch.zeros(B * H * W, C, device=attr.device, dtype=vals.dtype).index_put((pix,), vals)
    return out.view(B, H, W, C)


def face_neighbours(faces: torch.Tensor) -> torch.Tensor:
    """Triangle across each edge, (F, 3) long, -1 on a boundary; edge i is the one opposite vertex i.

    Edges are matched by vertex indices, so a mesh with split vertices (UV seams) shows
    boundaries there. Non-manifold edges get one of their other triangles.
    """
    F = faces.shape[0]
    if F == 0:
        return torch.empty(0, 3, dtype=torch.long, device=faces.device)
    a = faces[:, (1, 2, 0)].reshape(-1)
    b = faces[:, (2, 0, 1)].reshape(-1)
    n = int(faces.max()) + 1
    key = torch.minimum(a, b) * n + torch.maximum(a, b)  # (3F,)
    ks, order = torch.sort(key)
    same_next = torch.zeros_like(ks, dtype=torch.bool)
    same_next[:-1] = ks[1:] == ks[:-1]
    same_prev = torch.zeros_like(same_next)
    same_prev[1:] = same_next[:-1]
    pos = torch.arange(ks.numel(), device=faces.device)
    partner = torch.where(same_next, pos + 1, torch.where(same_prev, pos - 1, torch.full_like(pos, -1)))
    nb_sorted = torch.where(partner >= 0, torch.div(order[partner.clamp_min(0)], 3, rounding_mode="floor"), partner)
    nb = torch.empty_like(nb_sorted)
    nb[order] = nb_sorted
    return nb.view(F, 3)


def _cross2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _pixel_xy(pix: torch.Tensor, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Flat pixel indices (N,) of a (B, H, W) image -> pixel-centre coordinates (column, row), (N, 2)."""
    r = pix % (height * width)
    row = torch.div(r, width, rounding_mode="floor")
    return torch.stack([(r - row * width).to(dtype), row.to(dtype)], -1)


def _edge_values(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """2D edge functions of triangles s (N, 3, 2) at points p (N, 2): (N, 3), edge i opposite vertex i."""
    return torch.stack([_cross2(s[:, (i + 2) % 3] - s[:, (i + 1) % 3], p - s[:, (i + 1) % 3]) for i in range(3)], -1)


def antialias_torch(
    color: torch.Tensor, rast: torch.Tensor, clip: torch.Tensor, faces: torch.Tensor, max_walk: int = 4
) -> torch.Tensor:
    """Analytic antialiasing of silhouette edges, in the manner of nvdiffrast's `antialias`.

    color: (B, H, W, C) shaded image (background included); rast: (B, H, W, 4) from the
    same clip (B, V, 4) and faces. For every horizontally or vertically adjacent pixel
    pair showing different triangles, the nearer pixel's triangle is the occluder. The
    segment between the two pixel centres is followed from the occluder across the mesh
    (at most `max_walk` triangles) to the first silhouette edge: a mesh boundary, or an
    edge whose neighbour faces the other way on screen. Where the segment crosses it at
    fraction t, the occluder's colour spreads max(t - 1/2, 0) into the other pixel, or the
    other colour max(1/2 - t, 0) into the occluder's pixel. t depends on the projected
    edge vertices, which gives the silhouette gradients rasterization alone lacks.
    Horizontal pairs take mostly vertical edges and vertical pairs the others, so that no
    edge is counted twice. Unlike nvdiffrast, which only tests the occluder triangle's own
    edges, the walk also finds silhouettes behind thin grazing triangles that cover no
    pixel centre, the usual case on finely tessellated meshes.
    """
    B, H, W, C = color.shape
    if faces.shape[0] == 0:
        return color
    tri = rast[..., 3].detach().round().long().reshape(-1) - 1  # (B*H*W,)
    depth = rast[..., 2].detach().reshape(-1)
    w = clip[..., 3]
    w = torch.where(w > 0, w, torch.ones_like(w))  # vertices at w <= 0 belong to no drawn triangle
    screen = torch.stack([(clip[..., 0] / w + 1.0) * (0.5 * W) - 0.5, (1.0 - clip[..., 1] / w) * (0.5 * H) - 0.5], -1)
    with torch.no_grad():
        nbrs = face_neighbours(faces)  # (F, 3)
        screen_d = screen.detach()
        s_all = screen_d[:, faces]  # (B, F, 3, 2)
        face_sign = torch.sign(_cross2(s_all[:, :, 1] - s_all[:, :, 0], s_all[:, :, 2] - s_all[:, :, 0]))  # (B, F)
    flat = color.reshape(B * H * W, C)
    index, deltas = [], []
    grid = tri.view(B, H, W)
    for step, horizontal, left, right in (
        (1, True, grid[:, :, :-1], grid[:, :, 1:]),  # pairs (i, j), (i, j + 1)
        (W, False, grid[:, :-1, :], grid[:, 1:, :]),  # pairs (i, j), (i + 1, j)
    ):
        with torch.no_grad():
            nz = (left != right).nonzero()  # (N, 3): b, i, j of the first pixel
            if nz.shape[0] == 0:
                continue
            pa = (nz[:, 0] * H + nz[:, 1]) * W + nz[:, 2]
            pb = pa + step
            ta, tb = tri[pa], tri[pb]
            a_occludes = (tb < 0) | ((ta >= 0) & (depth[pa] < depth[pb]))
            occ = torch.where(a_occludes, pa, pb)
            oth = torch.where(a_occludes, pb, pa)
            batch = torch.div(occ, H * W, rounding_mode="floor")
            c_occ, c_oth = _pixel_xy(occ, H, W, screen.dtype), _pixel_xy(oth, H, W, screen.dtype)
            current = tri[occ].clone()
            found_tri = torch.full_like(current, -1)
            found_edge = torch.zeros_like(current)
            active = torch.arange(current.numel(), device=current.device)
            for _ in range(max_walk):
                if active.numel() == 0:
                    break
                cur = current[active]
                b = batch[active]
                s = screen_d[b[:, None], faces[cur]]  # (n, 3, 2)
                sg = face_sign[b, cur]
                e_occ = _edge_values(s, c_occ[active]) * sg[:, None]  # inside is positive
                e_oth = _edge_values(s, c_oth[active]) * sg[:, None]
                falling = e_oth < e_occ
                t_exit, edge = torch.where(falling, e_occ / torch.where(falling, e_occ - e_oth, 1.0), torch.inf).min(-1)
                nb = nbrs[cur, edge]
                silhouette = (nb < 0) | (face_sign[b, nb.clamp_min(0)] != sg)
                rows = torch.arange(cur.numel(), device=cur.device)
                d = s[rows, (edge + 2) % 3] - s[rows, (edge + 1) % 3]
                mostly_vertical = d[:, 1].abs() >= d[:, 0].abs()
                ours = mostly_vertical if horizontal else ~mostly_vertical
                stop = (t_exit >= 1.0) | (sg == 0) | silhouette
                hit = silhouette & (t_exit < 1.0) & (sg != 0) & ours
                found_tri[active[hit]] = cur[hit]
                found_edge[active[hit]] = edge[hit]
                current[active[~stop]] = nb[~stop]
                active = active[~stop]
            keep = (found_tri >= 0).nonzero().squeeze(1)
        if keep.numel() == 0:
            continue
        b, ft, fe = batch[keep], found_tri[keep], found_edge[keep]
        vj = faces[ft, (fe + 1) % 3]
        vk = faces[ft, (fe + 2) % 3]
        sj, sk = screen[b, vj], screen[b, vk]  # (n, 2), differentiable
        sg = face_sign[b, ft]
        eo = _cross2(sk - sj, c_occ[keep] - sj) * sg
        et = _cross2(sk - sj, c_oth[keep] - sj) * sg
        t = (eo / (eo - et)).clamp(0.0, 1.0)[:, None]
        occ_k, oth_k = occ[keep], oth[keep]
        col_occ, col_oth = flat[occ_k], flat[oth_k]
        index += [oth_k, occ_k]
        deltas += [(t - 0.5).clamp_min(0.0) * (col_occ - col_oth), (0.5 - t).clamp_min(0.0) * (col_oth - col_occ)]
    if not index:
        return color
    out = flat.index_add(0, torch.cat(index), torch.cat(deltas).to(flat.dtype))
    return out.view(B, H, W, C)

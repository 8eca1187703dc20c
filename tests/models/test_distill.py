"""Toy score distillation: a free 32x32 image optimised with the bundled prior becomes the prompted object."""
from __future__ import annotations

import pytest
import torch

from engine_server.models.bundled import procedural as P
from engine_server.models.bundled.evaluate import classify_color, foreground_mask
from engine_server.multiview import mask_iou
from engine_server.models.bundled.prior import BundledPrior
from engine_server.models.bundled.vocab import Caption

pytestmark = pytest.mark.slow  # a full SDS run on the bundled prior


def red_fraction(img: torch.Tensor, region: torch.Tensor) -> float:
    """Share of region pixels (H, W) whose colour is red-dominant."""
    r, g, b = img[0], img[1], img[2]
    red = (r > g + 0.25) & (r > b + 0.25)
    return float(red[region].float().mean())


def test_sds_moves_a_free_image_toward_a_red_disc():
    prior = BundledPrior.load()
    cam = P.orbit_cameras([30.0], [20.0], P.DEFAULT_DISTANCE, P.DEFAULT_FOV)
    gt = P.render_caption(Caption("red", "sphere"), cam)["rgb"]
    gt_mask = foreground_mask(gt)[0]
    gen = torch.Generator().manual_seed(0)
    image = (0.5 + 0.1 * torch.randn(1, 3, 32, 32, generator=gen)).clamp(0, 1).requires_grad_(True)
    opt = torch.optim.Adam([image], lr=0.03)

    def score(img):
        img = img.detach()
        m = foreground_mask(img)
        return float(mask_iou(m, gt_mask[None])[0]), red_fraction(img[0], gt_mask), classify_color(img[0], m[0])

    before = score(image)
    acp = prior.alphas_cumprod
    for _ in range(200):
        t = torch.randint(20, 980, (1,), generator=gen)
        noise = torch.randn(1, 3, 32, 32, generator=gen)
        x0 = image * 2 - 1
        x_t = acp[t].sqrt() * x0 + (1 - acp[t]).sqrt() * noise
        with torch.no_grad():
            v = prior.predict(x_t, t, "a red sphere", cam.c2w, guidance_scale=5.0)
            target = prior.predict_x0(x_t, t, v).clamp(-1, 1)
        loss = 0.5 * ((x0 - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            image.clamp_(0, 1)
    after = score(image)
    iou0, red0, _ = before
    iou1, red1, colour1 = after
    assert iou1 > iou0 + 0.3 and iou1 > 0.6, (before, after)
    assert red1 > red0 + 0.5, (before, after)
    assert colour1 == "red", (before, after)
    # outside the disc the image went to the background colour
    bg = torch.tensor(P.BACKGROUND_RGB).view(3, 1)
    outside = ~torch.nn.functional.max_pool2d(gt_mask[None, None].float(), 5, 1, 2)[0, 0].bool()
    assert float((image.detach()[0][:, outside] - bg).abs().mean()) < 0.15

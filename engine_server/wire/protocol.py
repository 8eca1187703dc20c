"""The wire protocol (v1) between the engine server and its clients: one definition for both sides.

A message is a ZeroMQ multipart message ``[header, signature, *blobs]``:

- ``header``: UTF-8 JSON object with the envelope fields ``v`` (protocol version),
  ``type``, ``id`` (the sender's message id), ``parent`` (the ``id`` of the request a
  reply answers; null for requests and job events), ``ts`` (sender's Unix time, s) and
  ``nonce`` (random hex, never reused), plus the typed fields of ``type``.
- ``signature``: 64 hex digits of HMAC-SHA256 over the header and every blob
  (see :mod:`engine_server.wire.auth`); an empty frame when authentication is off.
- ``blobs``: raw bytes, each referenced exactly once from the header by a JSON object
  with a ``"blob"`` key: ``{"blob": i, "dtype": "float32", "shape": [n, 3]}`` for a
  little-endian C-order array, ``{"blob": i, "format": "png"}`` for an image,
  ``{"blob": i, "format": "glb"}`` for a binary glTF file, ``{"blob": i, "format": "file"}``
  for any other exported file (OBJ, MTL, USD ...). A JSON object with a
  ``"blob"`` key is always a blob reference.

Nothing on the wire is ever unpickled. :func:`decode` checks, in order: frame count
and sizes, the signature (before any parsing), the JSON, what no field may hold anywhere
(nesting deeper than ``MAX_DEPTH``, strings or names that are not valid Unicode, integers
beyond ``±MAX_INT``: see :func:`check_tree`), the version, the replay window, the type,
the blob references, then the type's fields against :class:`Limits`; any failure raises
:class:`ProtocolError` naming the bad field, which the server turns into an ``error``
reply. Nothing else escapes :func:`decode`. Clients run the same checks on what they send.

No torch, bpy or numpy import at module level (this file is copied into the Blender
add-on); numpy is used lazily when present, to convert and check arrays.
"""
from __future__ import annotations

import json
import math
import re
import secrets
import struct
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from engine_server.wire.auth import ReplayGuard, Signer

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"
"""Where a local engine listens and clients connect by default (loopback only)."""
PROTOCOL_VERSION = 1
"""The version this module speaks, sent as ``v`` in every header."""
SUPPORTED_VERSIONS = (1,)
"""Versions this module accepts."""

KINDS = ("text", "image", "refine", "multiview")
"""Job kinds of a ``submit``."""
REFINE_MODES = ("full", "texture")
"""What a refine job may change: geometry and texture, or only the texture."""
EXPORT_FORMATS = ("glb", "obj", "usd", "usdz")
"""Values of ``options.format``: the file a job writes beside the GLB every job makes (glb: none)."""
FACES_RANGE = (100, 2_000_000)
"""Bounds of ``options.faces`` (the triangle budget the mesh is decimated to)."""
TEXTURE_SIZE_RANGE = (16, 8192)
"""Bounds of ``options.texture_size`` (pixels per side of the baked maps)."""
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
"""Lifecycle states of a job."""
TERMINAL_STATES = ("done", "failed", "cancelled")
"""States a job never leaves."""

CLIENT_TYPES = ("hello", "ping", "submit", "subscribe", "unsubscribe", "cancel", "result", "jobs", "delete")
"""Message types a client sends."""
SERVER_TYPES = (
    "welcome", "pong", "accepted", "busy", "ok", "job_list", "result", "error",
    "progress", "preview", "mesh", "done", "failed", "cancelled",
)
"""Message types the server sends: replies (linked by ``parent``) and job events (carrying ``job_id``)."""
EVENT_TYPES = ("progress", "preview", "mesh", "done", "failed", "cancelled")
"""Server messages about a job, sent to the clients subscribed to it."""

DTYPES: dict[str, tuple[str, int]] = {
    "float16": ("e", 2), "float32": ("f", 4), "float64": ("d", 8),
    "int8": ("b", 1), "uint8": ("B", 1), "int16": ("h", 2), "uint16": ("H", 2),
    "int32": ("i", 4), "uint32": ("I", 4), "int64": ("q", 8),
}
"""Array dtypes allowed on the wire: name -> (struct code, item size). Always little-endian."""
BLOB_FORMATS = ("png", "glb", "file")
"""Opaque blob formats allowed on the wire (file: an exported file's bytes, unchecked; its name says what it is)."""
MAX_NDIM = 4
"""Most dimensions of a wire array."""
MAX_DEPTH = 32
"""Deepest nesting of JSON objects and lists in a header (the deepest real field is 5 levels down)."""
MAX_INT = 2**63
"""Largest integer magnitude anywhere in a header: every number must fit a float and an int64."""

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_NONCE_RE = re.compile(r"[0-9a-f]{16,64}")
_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ENVELOPE = ("v", "type", "id", "parent", "ts", "nonce")


def is_loopback(endpoint: str) -> bool:
    """Whether an endpoint is reachable only from this machine: ipc / inproc, or tcp to 127.0.0.0/8, ::1, localhost."""
    import ipaddress

    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: may be public


@dataclass(frozen=True)
class Limits:
    """Bounds on every message and request field; the client checks them before sending, the server on receipt."""

    max_message_bytes: int = 64 * 2**20
    """Largest whole message a server accepts (header + blobs); also the socket's per-frame limit."""
    max_header_bytes: int = 256 * 2**10
    """Largest JSON header."""
    max_blobs: int = 8
    """Most blob frames in one message."""
    max_prompt_chars: int = 2000
    """Longest prompt or negative prompt."""
    max_image_bytes: int = 16 * 2**20
    """Largest PNG in a request."""
    max_image_pixels: int = 4096 * 4096
    """Most pixels (width x height) of a PNG in a request, read from its IHDR before any decoding."""
    max_image_side: int = 8192
    """Longest side of a PNG in a request."""
    max_mesh_vertices: int = 1_000_000
    """Most vertices of a request mesh."""
    max_mesh_faces: int = 2_000_000
    """Most triangles of a request mesh."""
    max_cameras: int = 64
    """Most cameras in a rig."""
    max_camera_side: int = 4096
    """Largest camera width or height in pixels."""
    max_options: int = 32
    """Most entries in a request's ``options``."""
    max_string_chars: int = 256
    """Longest short string (names, option values, messages are truncated to 4x this)."""
    max_list: int = 1000
    """Most jobs in one ``jobs`` listing."""

    def to_dict(self) -> dict[str, int]:
        """As plain JSON (sent in ``welcome``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Limits:
        """From ``to_dict`` output; unknown keys (a newer server) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in data.items() if k in known and isinstance(v, int)})


DEFAULT_LIMITS = Limits()
"""The limits both sides use unless configured otherwise."""
RECEIVE_LIMITS = Limits(max_message_bytes=2**30, max_header_bytes=16 * 2**20, max_blobs=64)
"""Envelope limits a client applies to what the server sends (results are large, job lists long)."""


class ProtocolError(Exception):
    """A malformed or refused message; becomes an ``error`` reply naming ``field``.

    Codes: ``malformed`` (frames, JSON, envelope), ``auth`` (unsigned or badly signed),
    ``replay`` (nonce reused, timestamp outside the window), ``version``,
    ``unknown_type``, ``invalid`` (a field's type or value), ``too_large`` (a bound).
    """

    def __init__(self, code: str, message: str, field: str | None = None, parent: str | None = None):
        # The message and field may quote the input: made encodable and short, so the reply always is.
        message = printable(message, 1024)
        field = printable(field, 256) if field is not None else None
        super().__init__(f"{code}: {message}" + (f" (field {field})" if field else ""))
        self.code = code
        self.message = message
        self.field = field
        self.parent = parent


def printable(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` and made encodable as UTF-8 (lone surrogates become ``\\udc80`` escapes)."""
    text = str(text)[:max_chars]
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")[:max_chars]


def _is_unicode(text: str) -> bool:
    """Whether a str is valid Unicode text (no lone surrogates, which UTF-8 cannot encode)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_tree(value: Any, parent: str | None = None) -> None:
    """Refuse what no field may hold, before any field is read; raises ProtocolError naming the place.

    Nesting deeper than MAX_DEPTH (so later checks never recurse far), keys or strings with
    lone surrogates (a ``"\\udc80"`` escape decodes to one; no UTF-8 reply could quote it),
    integers beyond ±MAX_INT (no float holds 10**400: converting it raises OverflowError).
    Iterative: a hostile depth cannot exhaust the stack here.
    """
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                raise ProtocolError("invalid", f"nested deeper than {MAX_DEPTH} levels", path or "header", parent)
            if isinstance(item, dict):
                for key, sub in item.items():
                    where = f"{path}.{key}" if path else key
                    if not _is_unicode(key):
                        raise ProtocolError("invalid", "field name is not valid Unicode (lone surrogate)", where, parent)
                    stack.append((sub, where, depth + 1))
            else:
                stack.extend((sub, f"{path}[{i}]", depth + 1) for i, sub in enumerate(item))
        elif isinstance(item, str):
            if not _is_unicode(item):
                raise ProtocolError("invalid", "string is not valid Unicode (lone surrogate)", path or "header", parent)
        elif type(item) is int and not -MAX_INT <= item <= MAX_INT:
            raise ProtocolError("invalid", f"integer out of range (more than {MAX_INT.bit_length() - 1} bits)",
                                path or "header", parent)


# ----------------------------------------------------------------------------- blob values


@dataclass(frozen=True, eq=False)
class Array:
    """A little-endian C-order array travelling as one blob: ``{"blob": i, "dtype": ..., "shape": [...]}``."""

    dtype: str
    """One of DTYPES."""
    shape: tuple[int, ...]
    """Dimensions; product x item size equals len(data)."""
    data: bytes | memoryview = field(repr=False)
    """Raw little-endian bytes."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not allowed; allowed: {', '.join(DTYPES)}")
        if len(self.shape) > MAX_NDIM or any(not isinstance(d, int) or d < 0 for d in self.shape):
            raise ValueError(f"bad shape {self.shape}")
        if math.prod(self.shape) * DTYPES[self.dtype][1] != len(self.data):
            raise ValueError(f"shape {self.shape} of {self.dtype} needs {math.prod(self.shape) * DTYPES[self.dtype][1]} bytes, got {len(self.data)}")

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @classmethod
    def from_numpy(cls, array) -> Array:
        """From a numpy array (converted to little-endian C order; the dtype must be in DTYPES)."""
        import numpy as np

        a = np.asarray(array)
        name = a.dtype.name
        if name not in DTYPES:
            raise ValueError(f"dtype {name} cannot travel on the wire; allowed: {', '.join(DTYPES)}")
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        return cls(name, tuple(int(d) for d in a.shape), memoryview(a).cast("B"))

    @classmethod
    def from_values(cls, dtype: str, shape: Sequence[int], values: Sequence[float | int]) -> Array:
        """From a flat sequence of Python numbers, without numpy."""
        code = DTYPES[dtype][0]
        return cls(dtype, tuple(shape), struct.pack(f"<{len(values)}{code}", *values))

    def numpy(self):
        """A read-only numpy view of the data (shape and dtype applied)."""
        import numpy as np

        return np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(self.shape)

    def values(self) -> list[float | int]:
        """Flat list of Python numbers, without numpy (slow for big arrays)."""
        code = DTYPES[self.dtype][0]
        return [v[0] for v in struct.iter_unpack("<" + code, self.data)]


@dataclass(frozen=True, eq=False)
class Image:
    """A PNG image travelling as one blob: ``{"blob": i, "format": "png"}``. Size read from IHDR."""

    data: bytes | memoryview = field(repr=False)
    """The PNG file's bytes."""
    width: int = 0
    """Width in pixels (from IHDR)."""
    height: int = 0
    """Height in pixels (from IHDR)."""

    @classmethod
    def from_png(cls, data: bytes | memoryview) -> Image:
        """Check the PNG signature and IHDR chunk (with its CRC) and read the size; raises ValueError."""
        width, height = png_size(data)
        return cls(data, width, height)


@dataclass(frozen=True, eq=False)
class Blob:
    """An opaque file travelling as one blob: ``{"blob": i, "format": "glb"}``."""

    data: bytes | memoryview = field(repr=False)
    """The file's bytes."""
    format: str = "glb"
    """One of BLOB_FORMATS other than png."""


def png_size(data: bytes | memoryview) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR, checked without decoding; raises ValueError for anything else."""
    head = bytes(data[:33])
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE:
        raise ValueError("not a PNG file (bad signature)")
    length, ctype = struct.unpack(">I4s", head[8:16])
    if length != 13 or ctype != b"IHDR":
        raise ValueError("PNG does not start with an IHDR chunk")
    width, height, depth, color = struct.unpack(">IIBB", head[16:26])
    (crc,) = struct.unpack(">I", head[29:33])
    if zlib.crc32(head[12:29]) != crc:
        raise ValueError("PNG IHDR chunk has a bad CRC")
    if width == 0 or height == 0 or width >= 2**31 or height >= 2**31:
        raise ValueError(f"PNG has an invalid size {width}x{height}")
    if color not in (0, 2, 3, 4, 6) or depth not in (1, 2, 4, 8, 16):
        raise ValueError(f"PNG has an invalid colour type {color} / bit depth {depth}")
    return width, height


def _check_glb(data: bytes | memoryview) -> None:
    head = bytes(data[:12])
    if len(head) < 12:
        raise ValueError("GLB shorter than its 12-byte header")
    magic, version, length = struct.unpack("<4sII", head)
    if magic != b"glTF" or version != 2:
        raise ValueError("not a binary glTF 2.0 file")
    if length != len(data):
        raise ValueError(f"GLB header says {length} bytes, blob has {len(data)}")


# ----------------------------------------------------------------------------- messages


def new_id() -> str:
    """A fresh message or request id (32 hex digits)."""
    return secrets.token_hex(16)


@dataclass
class Message:
    """One protocol message. After :func:`decode`, blob references in ``fields`` are Array / Image / Blob objects."""

    type: str
    """Message type (CLIENT_TYPES or SERVER_TYPES)."""
    fields: dict[str, Any] = field(default_factory=dict)
    """Typed fields of the type (everything in the header but the envelope)."""
    id: str = field(default_factory=new_id)
    """The sender's id of this message."""
    parent: str | None = None
    """Id of the request this message answers."""
    ts: float = field(default_factory=time.time)
    """Sender's Unix time in seconds."""
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))
    """Random, never reused: lets the receiver refuse replays."""

    def get(self, name: str, default: Any = None) -> Any:
        """A field's value."""
        return self.fields.get(name, default)

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    @property
    def job_id(self) -> str | None:
        """The job a job event or job reply is about."""
        return self.fields.get("job_id")


def make(type: str, parent: str | None = None, **fields: Any) -> Message:
    """A new message of ``type`` with fresh id, nonce and timestamp (None-valued fields are left out)."""
    return Message(type, {k: v for k, v in fields.items() if v is not None}, parent=parent)


def error_message(exc: ProtocolError, parent: str | None = None) -> Message:
    """The ``error`` reply for a refused message."""
    return make("error", parent=parent or exc.parent, code=exc.code, message=exc.message, field=exc.field)


def to_wire(value: Any, blobs: list, path: str = "") -> Any:
    """Replace blob values (Array, Image, Blob, numpy arrays) by references, appending their bytes."""
    if isinstance(value, Array):
        blobs.append(value.data)
        return {"blob": len(blobs) - 1, "dtype": value.dtype, "shape": list(value.shape)}
    if isinstance(value, Image):
        blobs.append(value.data)
        return {"blob": len(blobs) - 1, "format": "png"}
    if isinstance(value, Blob):
        blobs.append(value.data)
        return {"blob": len(blobs) - 1, "format": value.format}
    if isinstance(value, dict):
        if "blob" in value:
            raise ValueError(f"{path}: the key 'blob' is reserved for blob references")
        return {str(k): to_wire(v, blobs, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v, blobs, f"{path}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "__array_interface__") and hasattr(value, "dtype"):
        return to_wire(Array.from_numpy(value), blobs, path)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path}: non-finite number {value}")
    return value


def encode(msg: Message, signer: Signer) -> list[bytes | memoryview]:
    """Frames ``[header, signature, *blobs]`` of ``msg`` (blobs are sent without copying)."""
    blobs: list[bytes | memoryview] = []
    body = to_wire(msg.fields, blobs, "")
    clash = [k for k in _ENVELOPE if k in body]
    if clash:
        raise ValueError(f"field names {clash} are reserved for the envelope")
    header = {"v": PROTOCOL_VERSION, "type": msg.type, "id": msg.id, "parent": msg.parent,
              "ts": msg.ts, "nonce": msg.nonce, **body}
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    return [head, signer.sign([head, *blobs]), *blobs]


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed in JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} overflows")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


def decode(
    frames: Sequence[bytes | memoryview],
    signer: Signer,
    guard: ReplayGuard | None = None,
    limits: Limits = DEFAULT_LIMITS,
    *,
    from_client: bool = True,
) -> Message:
    """Parse and check one received message (frames after the ROUTER identity); raises ProtocolError.

    ``from_client``: the server decodes client messages (CLIENT_TYPES), a client decodes
    server messages (SERVER_TYPES). Unknown fields are refused in client messages and
    ignored in server messages, so an older client can talk to a newer server.
    """
    expect = CLIENT_TYPES if from_client else SERVER_TYPES
    if len(frames) < 2:
        raise ProtocolError("malformed", f"need at least 2 frames [header, signature], got {len(frames)}", "frames")
    blobs = frames[2:]
    if len(blobs) > limits.max_blobs:
        raise ProtocolError("too_large", f"{len(blobs)} blobs, at most {limits.max_blobs}", "blobs")
    total = sum(len(f) for f in frames)
    if total > limits.max_message_bytes:
        raise ProtocolError("too_large", f"message of {total} bytes, at most {limits.max_message_bytes}", "frames")
    head = frames[0]
    if len(head) > limits.max_header_bytes:
        raise ProtocolError("too_large", f"header of {len(head)} bytes, at most {limits.max_header_bytes}", "header")
    if signer.enabled:
        if len(frames[1]) == 0:
            raise ProtocolError("auth", "unsigned message (HMAC-SHA256 signatures are required)", "signature")
        if not signer.verify([head, *blobs], frames[1]):
            raise ProtocolError("auth", "bad signature (wrong key, or the message was altered)", "signature")
    try:
        header = json.loads(bytes(head).decode("utf-8"), parse_constant=_reject_constant,
                            parse_float=_finite_float, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("malformed", f"header is not valid UTF-8 JSON: {str(exc)[:200]}", "header") from None
    if not isinstance(header, dict):
        raise ProtocolError("malformed", f"header must be a JSON object, got {type(header).__name__}", "header")
    msg_id = header.get("id")
    parent = msg_id if isinstance(msg_id, str) and _ID_RE.fullmatch(msg_id) else None
    check_tree(header, parent)
    v = header.get("v")
    if type(v) is not int or v not in SUPPORTED_VERSIONS:
        raise ProtocolError("version", f"protocol version {str(v)[:20]!r} not supported; supported: {list(SUPPORTED_VERSIONS)}", "v", parent)
    if parent is None:
        raise ProtocolError("malformed", "id must be a string of 1-64 letters, digits or . _ : -", "id")
    ts, nonce = header.get("ts"), header.get("nonce")
    if type(ts) not in (int, float):  # finite and within ±MAX_INT: check_tree and the parser saw to it
        raise ProtocolError("malformed", "ts must be a number (Unix time in seconds)", "ts", parent)
    if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
        raise ProtocolError("malformed", "nonce must be 16-64 lowercase hex digits", "nonce", parent)
    if guard is not None:
        refusal = guard.check(nonce, float(ts))
        if refusal is not None:
            raise ProtocolError("replay", refusal[1], refusal[0], parent)
    mtype = header.get("type")
    if not isinstance(mtype, str) or mtype not in expect:
        raise ProtocolError("unknown_type", f"unknown message type {str(mtype)[:64]!r}; expected one of {', '.join(expect)}", "type", parent)
    reply_to = header.get("parent")
    if reply_to is not None and not (isinstance(reply_to, str) and _ID_RE.fullmatch(reply_to)):
        raise ProtocolError("malformed", "parent must be null or a message id", "parent", parent)
    body = {k: val for k, val in header.items() if k not in _ENVELOPE}
    used = [False] * len(blobs)
    try:
        body = from_wire(body, blobs, used, "")
        if not all(used):
            raise ProtocolError("malformed", f"blob {used.index(False)} is not referenced by the header", "blobs")
        checked = _schema(mtype, from_client)(_Fields(body, "", strict=from_client), limits)
    except ProtocolError as exc:
        exc.parent = parent
        raise
    return Message(mtype, checked, id=msg_id, parent=reply_to, ts=float(ts), nonce=nonce)


def from_wire(value: Any, blobs: Sequence[bytes | memoryview], used: list[bool], path: str = "") -> Any:
    """Replace blob references by Array / Image / Blob objects, checking each against its bytes."""
    if isinstance(value, list):
        return [from_wire(v, blobs, used, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    if "blob" not in value:
        return {k: from_wire(v, blobs, used, f"{path}.{k}" if path else k) for k, v in value.items()}
    where = path or "blob"
    i = value["blob"]
    if type(i) is not int or not 0 <= i < len(blobs):
        raise ProtocolError("malformed", f"blob index {str(i)[:20]} out of range (message has {len(blobs)} blobs)", where)
    if used[i]:
        raise ProtocolError("malformed", f"blob {i} referenced twice", where)
    used[i] = True
    data = blobs[i]
    keys = set(value)
    if keys == {"blob", "dtype", "shape"}:
        dtype, shape = value["dtype"], value["shape"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ProtocolError("invalid", f"dtype {str(dtype)[:20]!r} not allowed; allowed: {', '.join(DTYPES)}", where)
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or any(type(d) is not int or d < 0 for d in shape)):
            raise ProtocolError("invalid", f"shape must be a list of at most {MAX_NDIM} non-negative integers", where)
        need = math.prod(shape) * DTYPES[dtype][1]
        if need != len(data):
            raise ProtocolError("invalid", f"shape {shape} of {dtype} needs {need} bytes, blob {i} has {len(data)}", where)
        return Array(dtype, tuple(shape), data)
    if keys == {"blob", "format"}:
        fmt = value["format"]
        try:
            if fmt == "png":
                return Image.from_png(data)
            if fmt == "glb":
                _check_glb(data)
                return Blob(data, "glb")
            if fmt == "file":
                return Blob(data, "file")
        except ValueError as exc:
            raise ProtocolError("invalid", f"blob {i}: {exc}", where) from None
        raise ProtocolError("invalid", f"blob format {str(fmt)[:20]!r} not allowed; allowed: {', '.join(BLOB_FORMATS)}", where)
    raise ProtocolError("malformed", 'a blob reference is {"blob", "dtype", "shape"} or {"blob", "format"}', where)


# ----------------------------------------------------------------------------- field checks

_MISSING = object()


class _Fields:
    """Typed access to one JSON object's fields, naming the full path in every error."""

    def __init__(self, data: Any, path: str, strict: bool = True):
        if not isinstance(data, dict):
            raise ProtocolError("invalid", f"must be an object, got {_kind(data)}", path or "header")
        self.data, self.path, self.strict = data, path, strict
        self.seen: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str, required: bool) -> Any:
        self.seen.add(key)
        value = self.data.get(key, _MISSING)
        if value is None:
            value = _MISSING
        if value is _MISSING and required:
            raise ProtocolError("invalid", "required field is missing", self.name(key))
        return value

    def text(self, key: str, max_chars: int, *, required: bool = False, default: str | None = None,
             pattern: re.Pattern | None = None, choices: Sequence[str] | None = None, empty: bool = True) -> str | None:
        value = self.raw(key, required)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise ProtocolError("invalid", f"must be a string, got {_kind(value)}", self.name(key))
        if len(value) > max_chars:
            raise ProtocolError("too_large", f"{len(value)} characters, at most {max_chars}", self.name(key))
        if not empty and not value.strip():
            raise ProtocolError("invalid", "must not be empty", self.name(key))
        if "\x00" in value:
            raise ProtocolError("invalid", "must not contain NUL characters", self.name(key))
        if pattern is not None and not pattern.fullmatch(value):
            raise ProtocolError("invalid", f"{value[:64]!r} does not match {pattern.pattern}", self.name(key))
        if choices is not None and value not in choices:
            raise ProtocolError("invalid", f"{value[:64]!r} is not one of {', '.join(choices)}", self.name(key))
        return value

    def integer(self, key: str, lo: int, hi: int, *, required: bool = False, default: int | None = None) -> int | None:
        value = self.raw(key, required)
        if value is _MISSING:
            return default
        if type(value) is not int:
            raise ProtocolError("invalid", f"must be an integer, got {_kind(value)}", self.name(key))
        if not lo <= value <= hi:
            raise ProtocolError("invalid", f"{value} is outside [{lo}, {hi}]", self.name(key))
        return value

    def number(self, key: str, lo: float = -math.inf, hi: float = math.inf, *, required: bool = False,
               default: float | None = None, open_low: bool = False) -> float | None:
        value = self.raw(key, required)
        if value is _MISSING:
            return default
        return _number(value, self.name(key), lo, hi, open_low)

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, False)
        if value is _MISSING:
            return default
        if type(value) is not bool:
            raise ProtocolError("invalid", f"must be true or false, got {_kind(value)}", self.name(key))
        return value

    def obj(self, key: str, *, required: bool = False) -> _Fields | None:
        value = self.raw(key, required)
        if value is _MISSING:
            return None
        return _Fields(value, self.name(key), self.strict)

    def items(self, key: str, max_items: int, *, required: bool = False) -> list | None:
        value = self.raw(key, required)
        if value is _MISSING:
            return None
        if not isinstance(value, list):
            raise ProtocolError("invalid", f"must be a list, got {_kind(value)}", self.name(key))
        if len(value) > max_items:
            raise ProtocolError("too_large", f"{len(value)} items, at most {max_items}", self.name(key))
        return value

    def value(self, key: str, kinds: tuple[type, ...], *, required: bool = False) -> Any:
        value = self.raw(key, required)
        if value is _MISSING:
            return None
        if not isinstance(value, kinds):
            raise ProtocolError("invalid", f"must be {' or '.join(k.__name__ for k in kinds)}, got {_kind(value)}", self.name(key))
        return value

    def done(self) -> None:
        """Refuse fields that were never read (strict objects only)."""
        if self.strict:
            extra = sorted(set(self.data) - self.seen)
            if extra:
                raise ProtocolError("invalid", "unknown field", self.name(extra[0]))


def _kind(value: Any) -> str:
    if value is None or value is _MISSING:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", Array: "an array blob", Image: "a PNG blob", Blob: "a file blob"}.get(type(value), type(value).__name__)


def _number(value: Any, name: str, lo: float, hi: float, open_low: bool = False) -> float:
    if type(value) not in (int, float):
        raise ProtocolError("invalid", f"must be a number, got {_kind(value)}", name)
    # Compared before any conversion: int-float comparisons are exact, float(10**400) raises.
    finite = -MAX_INT <= value <= MAX_INT if type(value) is int else math.isfinite(value)
    if not finite or value < lo or value > hi or (open_low and value == lo):
        shown = str(value) if finite else "a number"
        raise ProtocolError("invalid", f"{shown} is outside {'(' if open_low else '['}{lo}, {hi}]", name)
    return float(value)


def _matrix4(value: Any, name: str) -> list[list[float]]:
    """A 4x4 matrix of finite numbers, rows first (Blender's ``matrix_world`` as nested lists)."""
    if not isinstance(value, list) or len(value) != 4 or any(not isinstance(r, list) or len(r) != 4 for r in value):
        raise ProtocolError("invalid", "must be a 4x4 matrix (4 rows of 4 numbers)", name)
    return [[_number(x, f"{name}[{i}][{j}]", -1e9, 1e9) for j, x in enumerate(row)] for i, row in enumerate(value)]


def _array(f: _Fields, key: str, dtypes: Sequence[str], ndim: int, last: int | None, max_rows: int,
           *, required: bool = False) -> Array | None:
    value = f.raw(key, required)
    if value is _MISSING:
        return None
    name = f.name(key)
    if not isinstance(value, Array):
        raise ProtocolError("invalid", f"must be an array blob reference, got {_kind(value)}", name)
    if value.dtype not in dtypes:
        raise ProtocolError("invalid", f"dtype {value.dtype} not allowed here; allowed: {', '.join(dtypes)}", name)
    if len(value.shape) != ndim or (last is not None and value.shape[-1] != last):
        want = "(n" + ", ?" * (ndim - 2) + (f", {last})" if last is not None else ")")
        raise ProtocolError("invalid", f"shape {list(value.shape)} should be {want}", name)
    if value.shape[0] > max_rows:
        raise ProtocolError("too_large", f"{value.shape[0]} rows, at most {max_rows}", name)
    return value


def _image(f: _Fields, key: str, limits: Limits, *, required: bool = False, bounded: bool = True) -> Image | None:
    value = f.raw(key, required)
    if value is _MISSING:
        return None
    name = f.name(key)
    if not isinstance(value, Image):
        raise ProtocolError("invalid", f"must be a PNG blob reference, got {_kind(value)}", name)
    if bounded:
        if len(value.data) > limits.max_image_bytes:
            raise ProtocolError("too_large", f"PNG of {len(value.data)} bytes, at most {limits.max_image_bytes}", name)
        if max(value.width, value.height) > limits.max_image_side or value.width * value.height > limits.max_image_pixels:
            raise ProtocolError("too_large", f"{value.width}x{value.height} image, at most {limits.max_image_pixels} pixels "
                                f"and {limits.max_image_side} per side", name)
    return value


def _job_id(f: _Fields, required: bool = True) -> str | None:
    return f.text("job_id", 64, required=required, pattern=_ID_RE)


def _options(f: _Fields, limits: Limits) -> dict[str, Any]:
    opts = f.obj("options")
    if opts is None:
        return {}
    if len(opts.data) > limits.max_options:
        raise ProtocolError("too_large", f"{len(opts.data)} options, at most {limits.max_options}", "options")
    out: dict[str, Any] = {}
    for key, value in opts.data.items():
        name = f"options.{key}"
        if not _NAME_RE.fullmatch(key):
            raise ProtocolError("invalid", "option names are identifiers of at most 64 characters", name[:80])
        if isinstance(value, str):
            if len(value) > limits.max_string_chars:
                raise ProtocolError("too_large", f"{len(value)} characters, at most {limits.max_string_chars}", name)
        elif type(value) is float and not math.isfinite(value):
            raise ProtocolError("invalid", "must be finite", name)
        elif value is not None and type(value) not in (bool, int, float):
            raise ProtocolError("invalid", f"option values are numbers, booleans, strings or null, got {_kind(value)}", name)
        out[key] = value
    _check_known_options(out)
    return out


def _check_known_options(options: Mapping[str, Any]) -> None:
    """The options every kind reads the same way: ``format`` (EXPORT_FORMATS), ``faces``, ``texture_size``."""
    fmt = options.get("format")
    if fmt is not None and fmt not in EXPORT_FORMATS:
        raise ProtocolError("invalid", f"must be one of {', '.join(EXPORT_FORMATS)}, got {str(fmt)[:20]!r}",
                            "options.format")
    for key, (lo, hi) in (("faces", FACES_RANGE), ("texture_size", TEXTURE_SIZE_RANGE)):
        value = options.get(key)
        if value is not None and (type(value) is not int or not lo <= value <= hi):
            raise ProtocolError("invalid", f"must be an integer from {lo:,} to {hi:,}, got {str(value)[:20]}",
                                f"options.{key}")


def check_mesh_arrays(vertices: Array, faces: Array, field_prefix: str = "mesh") -> None:
    """Vertices finite and face indices inside [0, V); raises ProtocolError (numpy used when present)."""
    n_vertices = vertices.shape[0]
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        v, fc = vertices.numpy(), faces.numpy()
        finite = bool(np.isfinite(v).all())
        lo, hi = (int(fc.min()), int(fc.max())) if fc.size else (0, -1)
    else:
        vals = vertices.values()
        finite = all(math.isfinite(x) for x in vals)
        idx = faces.values()
        lo, hi = (min(idx), max(idx)) if idx else (0, -1)
    if not finite:
        raise ProtocolError("invalid", "vertex coordinates must be finite", f"{field_prefix}.vertices")
    if lo < 0 or hi >= n_vertices:
        raise ProtocolError("invalid", f"face indices span [{lo}, {hi}] but the mesh has {n_vertices} vertices", f"{field_prefix}.faces")


# ----------------------------------------------------------------------------- per-type schemas


def _check_hello(f: _Fields, limits: Limits) -> dict:
    out = {"client": f.text("client", limits.max_string_chars, default="")}
    versions = f.items("versions", 16)
    if versions is not None and any(type(x) is not int for x in versions):
        raise ProtocolError("invalid", "must be a list of integers", "versions")
    out["versions"] = versions or [PROTOCOL_VERSION]
    f.done()
    return out


def _check_empty(f: _Fields, limits: Limits) -> dict:
    f.done()
    return {}


def _check_job_ref(f: _Fields, limits: Limits) -> dict:
    out = {"job_id": _job_id(f)}
    f.done()
    return out


def _check_result_request(f: _Fields, limits: Limits) -> dict:
    # glb true: the GLB and the files of the job's export format too; false: textures, arrays and meta only
    out = {"job_id": _job_id(f), "glb": f.flag("glb", True)}
    f.done()
    return out


def _check_jobs(f: _Fields, limits: Limits) -> dict:
    out = {"state": f.text("state", 16, choices=JOB_STATES),
           "limit": f.integer("limit", 1, limits.max_list, default=100)}
    f.done()
    return out


def _check_camera(value: Any, name: str, limits: Limits) -> dict:
    c = _Fields(value, name)
    cam = {
        "matrix_world": _matrix4(c.raw("matrix_world", True), c.name("matrix_world")),
        "fov_y_deg": c.number("fov_y_deg", 0.0, 179.0, required=True, open_low=True),
        "width": c.integer("width", 1, limits.max_camera_side, required=True),
        "height": c.integer("height", 1, limits.max_camera_side, required=True),
    }
    c.done()
    return cam


def _check_submit(f: _Fields, limits: Limits) -> dict:
    """The submit contract: every field's type and bounds (which fields a kind reads: pipelines/kinds.py).

    ``request_id`` (idempotency key), ``kind`` (KINDS), ``prompt`` / ``negative_prompt`` (text,
    default ""), ``seed`` (absent: the engine derives one from the job id), ``preset`` (absent:
    the engine's default; the names are the server's, sent in ``welcome``), ``mode`` (refine:
    REFINE_MODES, absent: full), ``subscribe`` (default true), ``options`` (flat: preset overrides
    and run settings; ``format``, ``faces`` and ``texture_size`` are bounded here for every kind), ``image`` (PNG), ``placement`` (4x4 world matrix the result rests at; rig
    cameras are taken relative to it), ``rig`` ([{matrix_world 4x4, fov_y_deg, width, height}]),
    ``mesh`` ({vertices (V, 3) float32, faces (F, 3) int32/uint32, matrix_world 4x4}).
    Optional fields are left out of the result when absent.
    """
    out: dict[str, Any] = {
        "request_id": f.text("request_id", 64, required=True, pattern=_ID_RE),
        "kind": f.text("kind", 16, required=True, choices=KINDS),
        "prompt": f.text("prompt", limits.max_prompt_chars, default=""),
        "negative_prompt": f.text("negative_prompt", limits.max_prompt_chars, default=""),
        "seed": f.integer("seed", 0, 2**32 - 1),
        "subscribe": f.flag("subscribe", True),
        "options": _options(f, limits),
    }
    preset = f.text("preset", 64, pattern=_NAME_RE)
    if preset is not None:
        out["preset"] = preset
    mode = f.text("mode", 16, choices=REFINE_MODES)
    if mode is not None:
        out["mode"] = mode
    image = _image(f, "image", limits)
    if image is not None:
        out["image"] = image
    placement = f.raw("placement", False)
    if placement is not _MISSING:
        out["placement"] = _matrix4(placement, "placement")
    rig = f.items("rig", limits.max_cameras)
    if rig is not None:
        out["rig"] = [_check_camera(cam, f"rig[{i}]", limits) for i, cam in enumerate(rig)]
    mesh = f.obj("mesh")
    if mesh is not None:
        vertices = _array(mesh, "vertices", ("float32",), 2, 3, limits.max_mesh_vertices, required=True)
        faces = _array(mesh, "faces", ("int32", "uint32"), 2, 3, limits.max_mesh_faces, required=True)
        if vertices.shape[0] < 3 or faces.shape[0] < 1:
            raise ProtocolError("invalid", "a mesh needs at least 3 vertices and 1 triangle", "mesh")
        check_mesh_arrays(vertices, faces)
        out["mesh"] = {"vertices": vertices, "faces": faces}
        matrix = mesh.raw("matrix_world", False)
        if matrix is not _MISSING:
            out["mesh"]["matrix_world"] = _matrix4(matrix, "mesh.matrix_world")
        mesh.done()
    f.done()
    return out


def _check_welcome(f: _Fields, limits: Limits) -> dict:
    out = {
        "server": f.text("server", limits.max_string_chars, default=""),
        "versions": f.items("versions", 16) or [],
        "models": f.items("models", 256) or [],
        "presets": f.items("presets", 64) or [],
        "device": f.text("device", limits.max_string_chars, default=""),
        "heartbeat_s": f.number("heartbeat_s", 0.0, 3600.0, default=1.0, open_low=True),
        "signature": f.text("signature", 32, default=""),
        "session": f.text("session", 64, default="", pattern=_ID_RE),
    }
    caps = f.obj("capabilities")
    out["capabilities"] = caps.data if caps is not None else {}
    lim = f.obj("limits")
    out["limits"] = lim.data if lim is not None else {}
    f.done()
    return out


def _check_pong(f: _Fields, limits: Limits) -> dict:
    out = {"server_ts": f.number("server_ts"), "jobs_running": f.integer("jobs_running", 0, 2**31),
           "session": f.text("session", 64, pattern=_ID_RE), "new_client": f.flag("new_client", False)}
    f.done()
    return {k: v for k, v in out.items() if v is not None}


def _check_accepted(f: _Fields, limits: Limits) -> dict:
    out = {
        "job_id": _job_id(f),
        "request_id": f.text("request_id", 64, required=True, pattern=_ID_RE),
        "state": f.text("state", 16, required=True, choices=JOB_STATES),
        "duplicate": f.flag("duplicate", False),
        "queue_position": f.integer("queue_position", 0, 2**31),
    }
    f.done()
    return out


def _check_busy(f: _Fields, limits: Limits) -> dict:
    out = {"queued": f.integer("queued", 0, 2**31, required=True),
           "max_queued": f.integer("max_queued", 0, 2**31, required=True),
           "retry_after_s": f.number("retry_after_s", 0.0, 86400.0, default=5.0)}
    f.done()
    return out


def _job_summary(value: Any, name: str) -> dict:
    j = _Fields(value, name, strict=False)
    _job_id(j)
    j.text("state", 16, required=True, choices=JOB_STATES)
    return value


def _check_ok(f: _Fields, limits: Limits) -> dict:
    out = {"job_id": _job_id(f, required=False), "state": f.text("state", 16, choices=JOB_STATES)}
    job = f.obj("job")
    if job is not None:
        out["job"] = _job_summary(job.data, "job")
    f.done()
    return {k: v for k, v in out.items() if v is not None}


def _check_job_list(f: _Fields, limits: Limits) -> dict:
    jobs = f.items("jobs", limits.max_list, required=True)
    out = {"jobs": [_job_summary(j, f"jobs[{i}]") for i, j in enumerate(jobs)]}
    f.done()
    return out


def _check_result(f: _Fields, limits: Limits) -> dict:
    out: dict[str, Any] = {"job_id": _job_id(f)}
    glb = f.value("glb", (Blob,))
    if glb is not None:
        out["glb"] = glb
    arrays = f.obj("arrays")
    out["arrays"] = {}
    if arrays is not None:
        for key, value in arrays.data.items():
            if not isinstance(value, Array):
                raise ProtocolError("invalid", f"must be an array blob reference, got {_kind(value)}", arrays.name(key))
            out["arrays"][key] = value
    for key in ("texture", "normal_texture"):
        image = _image(f, key, limits, bounded=False)
        if image is not None:
            out[key] = image
    files = f.obj("files")
    if files is not None:
        out["files"] = {}
        for name, value in files.data.items():
            if not _FILE_RE.fullmatch(name):
                raise ProtocolError("invalid", "file names are 1-64 letters, digits, '_', '.' or '-', no folders",
                                    files.name(name)[:80])
            if not isinstance(value, Blob) or value.format != "file":
                raise ProtocolError("invalid", f"must be a file blob reference, got {_kind(value)}", files.name(name))
            out["files"][name] = value
    meta = f.obj("meta")
    out["meta"] = meta.data if meta is not None else {}
    f.done()
    return out


def _check_error(f: _Fields, limits: Limits) -> dict:
    out = {"code": f.text("code", 64, required=True), "message": f.text("message", 4096, default=""),
           "field": f.text("field", 1024)}
    f.done()
    return out


def _check_progress(f: _Fields, limits: Limits) -> dict:
    out = {
        "job_id": _job_id(f),
        "stage": f.text("stage", 64, default=""),
        "step": f.integer("step", 0, 2**31, default=0),
        "total": f.integer("total", 0, 2**31, default=0),
        "loss": f.number("loss"),
        "eta_s": f.number("eta_s", 0.0),
        "message": f.text("message", 4096),
        "state": f.text("state", 16, choices=JOB_STATES),
    }
    f.done()
    return {k: v for k, v in out.items() if v is not None}


def _check_preview(f: _Fields, limits: Limits) -> dict:
    out = {"job_id": _job_id(f), "stage": f.text("stage", 64, default=""),
           "step": f.integer("step", 0, 2**31, default=0),
           "image": _image(f, "image", limits, required=True, bounded=False)}
    f.done()
    return out


def _check_mesh_event(f: _Fields, limits: Limits) -> dict:
    out: dict[str, Any] = {
        "job_id": _job_id(f),
        "stage": f.text("stage", 64, default=""),
        "step": f.integer("step", 0, 2**31, default=0),
        "vertices": _array(f, "vertices", ("float32",), 2, 3, 2**31, required=True),
        "faces": _array(f, "faces", ("int32", "uint32"), 2, 3, 2**31, required=True),
    }
    for key, last in (("uvs", 2), ("normals", 3), ("colors", None)):
        value = _array(f, key, ("float32", "float16", "uint8"), 2, last, 2**31)
        if value is not None:
            out[key] = value
    texture = _image(f, "texture", limits, bounded=False)
    if texture is not None:
        out["texture"] = texture
    f.done()
    return out


def _check_done(f: _Fields, limits: Limits) -> dict:
    out = {"job_id": _job_id(f)}
    summary = f.obj("summary")
    out["summary"] = summary.data if summary is not None else {}
    f.done()
    return out


def _check_failed(f: _Fields, limits: Limits) -> dict:
    out = {"job_id": _job_id(f), "code": f.text("code", 64, required=True),
           "message": f.text("message", 4096, default="")}
    f.done()
    return out


_SCHEMAS: dict[str, Callable[[_Fields, Limits], dict]] = {
    "hello": _check_hello, "ping": _check_empty, "submit": _check_submit,
    "subscribe": _check_job_ref, "unsubscribe": _check_job_ref, "cancel": _check_job_ref,
    "result": _check_result_request, "jobs": _check_jobs, "delete": _check_job_ref,
    "welcome": _check_welcome, "pong": _check_pong, "accepted": _check_accepted, "busy": _check_busy,
    "ok": _check_ok, "job_list": _check_job_list, "error": _check_error,
    "progress": _check_progress, "preview": _check_preview, "mesh": _check_mesh_event,
    "done": _check_done, "failed": _check_failed, "cancelled": _check_job_ref,
}
# "result" is both a request (job_id only) and a reply: the direction picks the schema.
_REPLY_SCHEMAS = {"result": _check_result}


def check_fields(msg_type: str, fields: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS, *, from_client: bool = True) -> dict:
    """The normalized fields of a message about to be sent; raises ProtocolError naming the bad field.

    The client calls this before sending, so a request the server would refuse never
    leaves; the fields may hold Array / Image / Blob objects or numpy arrays.
    """
    blobs: list = []
    try:
        wire = to_wire(dict(fields), blobs, "")
    except ValueError as exc:
        raise ProtocolError("invalid", str(exc)) from None
    check_tree(wire)
    used = [False] * len(blobs)
    resolved = from_wire(wire, blobs, used, "")
    if msg_type not in (CLIENT_TYPES if from_client else SERVER_TYPES):
        raise ProtocolError("unknown_type", f"unknown message type {msg_type!r}", "type")
    return _schema(msg_type, from_client)(_Fields(resolved, "", strict=from_client), limits)


def _schema(msg_type: str, from_client: bool) -> Callable[[_Fields, Limits], dict]:
    return _SCHEMAS[msg_type] if from_client else _REPLY_SCHEMAS.get(msg_type, _SCHEMAS[msg_type])

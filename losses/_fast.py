"""The fast path of DetectionLoss and PolygonLoss (the CUDA default, or `cuda_graphs=True`): the same loss, one host
sync, one static core.

Host side: the call's tensors are copied into static buffers kept per layout (`FastPath._layout`: shapes, dtypes,
devices; the batch's rows padded up to `row_capacity`, the padding rows made neutral inside the graph), then one CUDA
graph (`GraphedFunction`) runs every value check of the reference (`deferred_checks`), counts objects per image and
fills the per-image target slots; the one host sync reads its failure flag and the largest count. Slots are cut to
that count padded up to a multiple of `SLOT_MULTIPLE` (padding slots are masked, so the assignment does not change).
After the first call the core does not wait for that sync: it is queued at the largest count of the last calls (and
redone in the rare call whose count is larger), the status travels to pinned host memory behind the checks, and
the sync waits for the checks alone. So the core may run on inputs a check rejects: the slots are then emptied, and
every kernel keeps its indices in range for any prediction values (NaN included); its result is never returned.
Where graphs do not run (the CPU, no autograd, autocast) the same functions run eagerly, with the same one sync.
Core: anchors' decode, assignment and every term, with the positives gathered through a fixed-capacity index instead
of `nonzero()`: no host sync and no data-dependent shape, so `GraphedCore` captures it, forward and backward, as CUDA
graphs and replays it, reading the predictions straight from the static buffers (its `preloaded` inputs). On the CPU
(or when capture fails) the same core runs eagerly. The core's hot parts are the fused kernels of `losses._kernels`
(the DFL expectation with the positive DFL term, the box term at the positives with its CIoU gradient, the class
term from each anchor's class and target score, and through `task_aligned_assign` the assignment metric chain);
where Triton does not run, their pure-torch specs. Results equal the reference path up to summation order
(tests/test_fast_paths.py).

Capacity: a real gt keeps at most `topk` positives (its top-k candidates; conflict resolution only removes, the
coverage rescue adds one only to a gt that had none), so an image has at most n_slots * topk positives and the index
holds min(B * A, B * n_slots * topk) entries: no positive is ever dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from heads._decode import decode_polygons, dist2bbox, make_anchors

from . import _kernels
from ._graphs import GraphedCore, GraphedFunction
from ._validate import LossInputError, deferred_checks
from ._vertex import vertex_term
from .assigner import task_aligned_assign

SLOT_MULTIPLE = 8  # few distinct padded shapes (few graph captures) for little padding work
SLOT_VIEW_CACHE = 32  # cut views of the graphs' static slots kept (FastPath._slot_views)
PROGRESS_CACHE = 64  # progress values kept as device tensors (FastPath._progress_value)
LOAD_CACHE = 64  # copy targets of a call's inputs kept, per layout and row count (FastPath._load_targets)
SLOT_HISTORY = 8  # calls whose largest slot count the next call's core is first queued at (FastPath.slot_guess)
MIN_ROW_CAPACITY = 64  # the batch buffers' smallest row count (see row_capacity)
NEUTRAL_VALUES = {"batch_idx": 0, "cls": 0, "bboxes": 0.5, "polygons": 0.5, "polygon_mask": True}


def check_cuda_graphs(cuda_graphs) -> bool | None:
    """The losses' `cuda_graphs` argument: True, False or None (the default: decided per call, see `use_fast_path`)."""
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise TypeError(f"cuda_graphs is {cuda_graphs!r}; expected True, False or None")
    return cuda_graphs


def use_fast_path(cuda_graphs: bool | None, fast: FastPath | None, preds) -> bool:
    """Whether a loss call takes the fast path: never for a batch of no image (B = 0: nothing to speed up, and the
    graphs' padding rows need an image to name); else `cuda_graphs` when it is True or False; when None, yes for CUDA
    predictions unless a CUDA-graph capture of this loss has failed (then the eager reference is the faster choice)."""
    scores = preds.get("scores") if isinstance(preds, Mapping) else None
    if isinstance(scores, torch.Tensor) and scores.ndim and scores.shape[0] == 0:
        return False
    if cuda_graphs is not None:
        return cuda_graphs
    if not (isinstance(scores, torch.Tensor) and scores.is_cuda):
        return False  # the CPU (or an input the checks will reject): the reference path, its errors
    return fast is None or fast.core.disabled_reason is None


def kept(cache: dict, limit: int, key, build: Callable[[], object]):
    """`cache[key]`, built by `build()` on first use; a cache holding `limit` entries is emptied first (a bound on
    memory where keys vary over a run: object counts, progress values)."""
    if key not in cache:
        if len(cache) >= limit:
            cache.clear()
        cache[key] = build()
    return cache[key]


def padded_slot_count(n: int) -> int:
    """The per-image slot count the core sees: n rounded up to a multiple of SLOT_MULTIPLE (at least one multiple)."""
    return max(SLOT_MULTIPLE, -(-n // SLOT_MULTIPLE) * SLOT_MULTIPLE)


def row_capacity(n: int) -> int:
    """Rows of the static batch buffers for a batch of n objects: the next power of two, at least MIN_ROW_CAPACITY.
    Few distinct values over a training run (few captures), and never below padded_slot_count(n)."""
    return max(MIN_ROW_CAPACITY, 1 << max(n - 1, 0).bit_length())


def neutral_padding(batch: Mapping[str, torch.Tensor], in_use: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch entries with rows not `in_use` (N,) replaced by values every check accepts (NEUTRAL_VALUES)."""
    padded = dict(batch)
    for key, value in NEUTRAL_VALUES.items():
        if key in batch:
            t = batch[key]
            padded[key] = torch.where(in_use.view(-1, *([1] * (t.ndim - 1))), t, torch.full((), value, dtype=t.dtype,
                                                                                           device=t.device))
    return padded


def positive_index(fg_mask: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (B*A) indices of the positives in row-major order (as `nonzero()`), padded to `capacity`, and validity.

    Sync-free: each positive's rank is a cumulative sum, scattered into a fixed buffer; background anchors land in one
    dump slot that is cut off. Filler entries keep distinct indices (their own position), because a gather's backward
    serialises on repeated indices.
    """
    flat = fg_mask.reshape(-1)
    rank = torch.cumsum(flat, 0) - 1
    slot = torch.where(flat, rank, torch.full_like(rank, capacity))
    index = torch.arange(capacity + 1, device=flat.device)
    index.scatter_(0, slot, torch.arange(flat.numel(), device=flat.device))
    valid = torch.arange(capacity, device=flat.device) < flat.sum()
    return index[:capacity], valid


class _GatherAnchors(torch.autograd.Function):
    """x (B, C, A) -> x[image, :, anchor] (K, C); the backward adds rows straight into a zero gradient in x's layout.

    Autograd's own index backward permutes the indexed dims to the front of a (B, C, A) gradient and back (a copy of
    the whole tensor each way), or, gathered from a transposed view, hands back a transposed gradient whose
    accumulation is a strided add; a flat `index_add_` avoids both (about 0.3 ms at shape (a) on an H200).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, image: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        _, c, a = x.shape
        channel = torch.arange(c, device=x.device)
        flat = (image[:, None] * c + channel) * a + anchor[:, None]  # (K, C) offsets in x's logical order
        ctx.save_for_backward(flat)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return torch.take(x, flat)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (flat,) = ctx.saved_tensors
        numel = ctx.x_shape[0] * ctx.x_shape[1] * ctx.x_shape[2]
        grad_x = torch.zeros(numel, dtype=grad.dtype, device=grad.device)
        grad_x.index_add_(0, flat.reshape(-1), grad.reshape(-1))
        return grad_x.view(ctx.x_shape), None, None


def gather_anchors(x: torch.Tensor, image: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """x[image, :, anchor] for x (B, C, A) and index pairs (K,), as (K, C), with a cheap backward."""
    return _GatherAnchors.apply(x, image, anchor)


def positive_vertices(raw: torch.Tensor, image: torch.Tensor, anchor: torch.Tensor, anchor_points: torch.Tensor,
                      stride_tensor: torch.Tensor) -> torch.Tensor:
    """Vertices (K, V, 2) of anchors (image, anchor) in their own stride units, decoded with the head's decode."""
    stride = stride_tensor[anchor]  # (K, 1)
    rows = gather_anchors(raw, image, anchor)  # (K, 2*np); raw[image, :, anchor] with a cheaper backward
    # decode_polygons takes (B, 2*np, A): the K anchors are decoded as one image of K anchors.
    pixels = decode_polygons(rows.T.contiguous()[None], anchor_points[anchor], stride)
    return (pixels[0].T / stride.to(pixels.dtype)).reshape(-1, raw.shape[1] // 2, 2)


@dataclass
class _Prepared:
    """A call's checks and target slots, queued: `status` (failed, largest count) is on the host once `ready`
    (None: already there), `slots` hold `capacity` per image, `grid` the anchors, `preloaded` are the core's static
    input buffers."""

    status: torch.Tensor
    ready: torch.cuda.Event | None
    slots: tuple
    capacity: int
    grid: tuple[torch.Tensor, torch.Tensor]  # anchor points and strides
    preloaded: list | tuple


class FastPath:
    """Fast evaluation for one DetectionLoss, or (with `polygon`) one PolygonLoss; holds the CUDA-graph caches."""

    def __init__(self, detection, polygon=None):
        self.det = detection
        self.poly = polygon
        self.core = GraphedCore(self._core)
        self.prep = GraphedFunction()
        self._constants: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pred_buffers: dict[tuple, dict[str, torch.Tensor]] = {}
        self._batch_buffers: dict[tuple, dict[str, torch.Tensor]] = {}
        self._all_real = False  # set per call: the batch has no polygon_mask (part of the graph key)
        self._recent_slots: deque[int] = deque(maxlen=SLOT_HISTORY)  # padded object counts of the last calls
        self._status_host: torch.Tensor | None = None  # pinned, where the status of CUDA calls is read
        self._status_ready: torch.cuda.Event | None = None
        self._slot_view_cache: dict[tuple, list[torch.Tensor]] = {}  # (slots' address, B, n) -> views
        self._progress_values: dict[tuple, torch.Tensor] = {}
        self._load_cache: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}  # see _load_targets

    @property
    def pred_keys(self) -> tuple[str, ...]:
        return ("boxes", "scores") if self.poly is None else ("boxes", "scores", "polygons")

    def batch_keys(self, batch) -> tuple[str, ...]:
        keys = ("batch_idx", "cls", "bboxes")
        if self.poly is None:
            return keys
        return keys + (("polygons",) if batch.get("polygon_mask") is None else ("polygons", "polygon_mask"))

    # ---------------------------------------------------------------------------------------------- host side
    def _evaluate(self, preds, batch, progress: float | None = None) -> torch.Tensor:
        """The core's output for this call (`progress` given: the polygon core's). Its slot count is known only after
        the one host sync; where earlier calls give a guess (`slot_guess`), the core is queued at the guess first and
        the sync waits for the checks alone, so the device does not idle while the host prepares the core. A guess
        below the count is redone at the count; a guess above it only adds padding slots (masked)."""
        prepared = self._prepare(preds, batch)
        extra, key = (), ()
        if progress is not None:
            extra = (self._progress_value(progress, preds["scores"].device),)
            self._all_real = batch.get("polygon_mask") is None
            key = (self._all_real,)
        guess = self.slot_guess(prepared.capacity)
        if guess is None:
            return self._run_core(preds, prepared, self._settle(preds, batch, prepared), extra, key)
        try:
            out = self._run_core(preds, prepared, guess, extra, key)
        except Exception:
            self._settle(preds, batch, prepared)  # an input error explains the failure: it is raised instead
            raise
        n = self._settle(preds, batch, prepared)
        return out if n <= guess else self._run_core(preds, prepared, n, extra, key)

    def _progress_value(self, progress: float, device: torch.device) -> torch.Tensor:
        """`progress` as a 0-d float32 tensor on `device` (the polygon core's input), kept per value: a schedule
        that changes per epoch builds each value once."""
        return kept(self._progress_values, PROGRESS_CACHE, (progress, device),
                    lambda: torch.full((), progress, dtype=torch.float32, device=device))

    def slot_guess(self, capacity: int) -> int | None:
        """The slot count the next core starts at: the largest of the last SLOT_HISTORY calls (within `capacity`,
        the slots prepared), None before the first call."""
        return min(max(self._recent_slots), capacity) if self._recent_slots else None

    def _prepare(self, preds, batch) -> _Prepared:
        """Every check, the largest object count and the target slots, queued; their status on its way to the host.
        Where the graphs run, the predictions sit in static buffers (`GraphedCore`'s `preloaded`)."""
        layout = self._layout(preds, batch) if self._graphed(preds) else None
        preloaded = ()
        try:
            if layout is not None:
                try:
                    status, slots, capacity, pred_buffers = self._prepare_graphed(preds, batch, layout)
                except RuntimeError as exc:  # capture refused: from now on everything runs eagerly
                    self.core.disabled_reason = f"CUDA-graph capture of the input checks failed, running eagerly: {exc}"
                    torch.cuda.synchronize()
                    layout = None
            if layout is None:
                capacity = padded_slot_count(batch["batch_idx"].shape[0])
                status, slots = self._checked_slots(preds, batch, None, capacity)
        except LossInputError:  # a structural check raised: report what the reference reports first
            self._recheck(preds, batch)
            raise
        anchor_points, stride_tensor, _ = self._grid(preds["feats"], preds["scores"])
        if layout is not None:
            # Anchors and strides are constants, their own buffers.
            preloaded = [pred_buffers["boxes"], pred_buffers["scores"], anchor_points, stride_tensor, None, None, None]
            if self.poly is not None:
                preloaded += [pred_buffers["polygons"], None, None]
        return _Prepared(*self._status_to_host(status), slots, capacity, (anchor_points, stride_tensor), preloaded)

    def _status_to_host(self, status: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """A copy of `status` on the host, queued behind the checks (so that reading it waits for them and not for
        whatever is queued later), and the event that marks it done; a CPU status is its own copy."""
        if not status.is_cuda:
            return status, None
        if self._status_host is None:
            self._status_host = torch.empty(status.shape, dtype=status.dtype, pin_memory=True)
            self._status_ready = torch.cuda.Event()
        self._status_host.copy_(status, non_blocking=True)
        # The stream looked up by the status's device (its index): record() without one looks the device up the slow
        # way (tens of us of host time).
        self._status_ready.record(torch.cuda.current_stream(status.device))
        return self._status_host, self._status_ready

    def _settle(self, preds, batch, prepared: _Prepared) -> int:
        """The one host sync: raises what the reference raises if a deferred check failed; else the padded object
        count, remembered for the next calls' guesses."""
        if prepared.ready is not None:
            prepared.ready.synchronize()
        failed, n = prepared.status.tolist()
        if failed:
            self._recheck(preds, batch)
            raise RuntimeError("a deferred input check failed, but the same checks passed when run eagerly")
        n = padded_slot_count(n)
        self._recent_slots.append(n)
        return n

    def _run_core(self, preds, prepared: _Prepared, n: int, extra: tuple, key: tuple) -> torch.Tensor:
        core_in = self._core_inputs(preds, prepared, n)
        return self.core(*core_in, *extra, key=key, preloaded=prepared.preloaded)

    def _core_inputs(self, preds, prepared: _Prepared, n: int) -> list[torch.Tensor]:
        """The core's inputs, the slots cut to `n` (the padded object count, or a guess above it)."""
        anchor_points, stride_tensor = prepared.grid
        core_in = [preds["boxes"], preds["scores"], anchor_points, stride_tensor]
        slots = self._slot_views(prepared, preds["scores"].shape[0], n)
        if self.poly is None:
            return core_in + slots
        return core_in + slots[:3] + [preds["polygons"]] + slots[3:]

    def _slot_views(self, prepared: _Prepared, b: int, n: int) -> list[torch.Tensor]:
        """The slot tensors cut to b images and n slots; views of a graph's static slots are kept (a few aten calls
        of host time each, per call otherwise)."""
        labels, bboxes, mask, extra = prepared.slots

        def cut() -> list[torch.Tensor]:
            return [t[:b, :n] for t in (labels, bboxes, mask, *(extra or ()))]

        if not prepared.preloaded:  # eager: fresh slots every call
            return cut()
        return kept(self._slot_view_cache, SLOT_VIEW_CACHE, (labels.data_ptr(), b, n), cut)

    def _graphed(self, preds) -> bool:
        """Whether this call's checks and core run as CUDA graphs (see GraphedCore.usable)."""
        tensors = tuple(preds[k] for k in self.pred_keys if isinstance(preds.get(k), torch.Tensor))
        return bool(tensors) and self.core.usable(tensors)

    def _layout(self, preds, batch) -> tuple | None:
        """The graph key (pred key, batch key, N) of a call whose checks can run inside a CUDA graph, else None.

        A capture runs the checks' structural part (types, keys, shapes, dtypes, devices) once, on buffers of the
        call's shapes; a replay skips it. So the key holds everything that part reads, with the batch's row count N
        replaced by its buffers' row capacity (`row_capacity`). Anything irregular (a missing key, a non-tensor, row
        counts that disagree) gives None: the eager checks then name it.
        """
        if not (isinstance(preds, Mapping) and isinstance(batch, Mapping)):
            return None
        try:
            pred_tensors = [preds[k] for k in self.pred_keys]
            feats = preds["feats"]
            batch_tensors = [batch[k] for k in self.batch_keys(batch)]
            feat_key = tuple((tuple(f.shape), f.dtype, f.device) for f in feats)
        except (KeyError, TypeError, AttributeError):
            return None
        if not all(isinstance(t, torch.Tensor) for t in pred_tensors + batch_tensors):
            return None
        if not isinstance(feats, (list, tuple)):
            return None
        n = batch_tensors[0].shape[0] if batch_tensors[0].ndim else -1
        if n < 0 or any(t.ndim == 0 or t.shape[0] != n for t in batch_tensors):
            return None
        pred_key = (tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in pred_tensors), feat_key,
                    type(feats))
        batch_key = (tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in batch_tensors), row_capacity(n))
        return pred_key, batch_key, n

    def _prepare_graphed(self, preds, batch, layout):
        """Load the call into this layout's static buffers and replay the graph of checks and slot filling; returns
        its status and slots, the slots per image and the prediction buffers."""
        pred_key, batch_key, n = layout
        pred_buffers = self._buffers(self._pred_buffers, pred_key, preds, self.pred_keys, None)
        batch_buffers = self._buffers(self._batch_buffers, batch_key, batch, self.batch_keys(batch), batch_key[-1])
        keys = self.batch_keys(batch)
        targets, row_count = self._load_targets(layout, pred_buffers, batch_buffers, keys)
        with torch.no_grad():  # one call for all the copies (a list of copies in C++, not Python), the row count too
            torch._foreach_copy_(targets, [preds[k] for k in self.pred_keys] + [batch[k] for k in keys] + [row_count])
        self.core.preloaded_changed()
        static_preds = dict(pred_buffers, feats=preds["feats"])
        static_batch = {k: batch_buffers[k] for k in keys}

        def checked_slots():
            return self._checked_slots(static_preds, static_batch, batch_buffers["rows"], batch_key[-1])

        status, slots = self.prep((pred_key, batch_key), checked_slots)
        return status, slots, batch_key[-1], pred_buffers

    def _load_targets(self, layout, pred_buffers, batch_buffers, keys) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Where a call of this layout with n rows is copied (the prediction buffers, the batch buffers' first n rows,
        the 0-d row count) and the row count's source (a constant 0-d tensor holding n), kept per (layout, n): a
        host call per view otherwise."""
        n = layout[-1]

        def build() -> tuple[list[torch.Tensor], torch.Tensor]:
            targets = [pred_buffers[k] for k in self.pred_keys] + [batch_buffers[k][:n] for k in keys]
            return targets + [batch_buffers["rows"]], batch_buffers["row_counts"][n]

        return kept(self._load_cache, LOAD_CACHE, layout, build)

    @staticmethod
    def _buffers(cache: dict, key: tuple, source, names, rows: int | None) -> dict[str, torch.Tensor]:
        """Static buffers for `names` of `source`, kept per key: same shapes (`rows` rows, for batch entries) and
        grad flags; batch buffers also get "rows", the 0-d count of rows in use, and "row_counts", 0 to `rows` (the
        values it is copied from)."""
        if key not in cache:
            buffers = {}
            for k in names:
                t = source[k]
                shape = t.shape if rows is None else (rows, *t.shape[1:])
                buffers[k] = torch.zeros(shape, dtype=t.dtype, device=t.device).requires_grad_(
                    rows is None and t.requires_grad)
            if rows is not None:
                device = source[names[0]].device
                buffers["rows"] = torch.zeros((), dtype=torch.long, device=device)
                buffers["row_counts"] = torch.arange(rows + 1, device=device)
            cache[key] = buffers
        return cache[key]

    def _checked_slots(self, preds, batch, rows: torch.Tensor | None, capacity: int | None):
        """The reference checks' failure flag and the largest per-image object count, as `status` (2,) long, and the
        target slots at `capacity` per image (labels, boxes, mask, polygon extras); no host sync.

        With `rows` (a 0-d count), only the batch's first `rows` rows are objects: the others take values every check
        accepts and count as a virtual image B after the real ones, which the slots of images [0, B) never see.
        """
        det, poly = self.det, self.poly
        with deferred_checks() as checks:
            boxes, scores, feats = det._check_preds(preds)
            b = scores.shape[0]
            imgsz = self._grid(feats, scores)[2]
            in_use = None
            if rows is not None:
                in_use = torch.arange(batch["batch_idx"].shape[0], device=rows.device) < rows
                batch = neutral_padding(batch, in_use)
            batch_idx, cls, bboxes = det._check_batch(batch, b, imgsz)
            if poly is not None:
                poly._check_pred_polygons(preds)
                polygons, polygon_mask = poly._check_batch_polygons(batch, imgsz)
        image = batch_idx.clamp(0, b - 1)  # clamped, so an invalid index can't fault before the checks report it
        if in_use is not None:
            image = torch.where(in_use, image, b)
        counts = det.image_counts(image, b + 1)
        failed = checks.failure(scores.device)
        status = torch.stack((failed.long(), counts[:b].max()))
        capacity = capacity or padded_slot_count(batch_idx.shape[0])
        gt = det.fill_slots(image, cls, bboxes, counts, capacity, imgsz)
        # A core may be queued before the status is read (see _evaluate): after a failed check the slots hold no
        # object, so that no unchecked value (a class index, a box) reaches the core's indexing.
        ok = ~failed
        detection_slots = (torch.where(ok, gt.labels, 0), torch.where(ok, gt.bboxes, 0), gt.mask & ok)
        if poly is None:
            return status, (*detection_slots, None)
        scale = torch.stack((imgsz[1], imgsz[0])).to(polygons.dtype)
        if polygons.shape[0] == 0:  # no objects: every slot is padding, gather from one dummy row
            polygons = polygons.new_zeros((1, *polygons.shape[1:]))
            polygon_mask = polygon_mask.new_ones((1, polygon_mask.shape[1]))
        rows_of_slots = gt.rows.clamp(min=0)
        gt_polygons = (polygons * scale)[rows_of_slots]  # (B + 1, capacity, V, 2) pixels
        gt_polygon_mask = polygon_mask[rows_of_slots] & (gt.rows >= 0)[..., None]
        return status, (*detection_slots, (gt_polygons, gt_polygon_mask))

    def _grid(self, feats, scores: torch.Tensor):
        """Anchors, strides and the image size for these feature-map shapes: constants, built once per shape."""
        # make_anchors follows feats[0]'s dtype and device, the image size the scores' (as the reference path).
        key = (tuple(tuple(f.shape[2:]) for f in feats), feats[0].dtype, feats[0].device, scores.dtype, scores.device)
        if key not in self._constants:
            anchor_points, stride_tensor = make_anchors(feats, self.det.strides)
            self._constants[key] = (anchor_points, stride_tensor, image_size(self.det.strides, feats, scores))
        return self._constants[key]

    def _recheck(self, preds, batch) -> None:
        """The reference checks, eagerly and in order: raises the error the reference path raises."""
        det, poly = self.det, self.poly
        boxes, scores, feats = det._check_preds(preds)
        imgsz = image_size(det.strides, feats, scores)
        det._check_batch(batch, scores.shape[0], imgsz)
        if poly is not None:
            poly._check_pred_polygons(preds)
            poly._check_batch_polygons(batch, imgsz)

    def detection_loss(self, preds, batch) -> torch.Tensor:
        """Gain-scaled [box, cls, dfl] (3,) times B, as DetectionLoss returns it."""
        return self._evaluate(preds, batch)

    def polygon_loss(self, preds, batch, progress: float) -> torch.Tensor:
        """Gain-scaled [box, polygon, cls, dfl] (4,) times B, as PolygonLoss returns it."""
        return self._evaluate(preds, batch, progress)

    # ---------------------------------------------------------------------------------------------- the core
    def _core(self, *tensors: torch.Tensor) -> torch.Tensor:
        """The loss vector times B (inside the graph: the caller's backward then has no multiply of its own)."""
        vector = self._detection_core(*tensors)[0] if self.poly is None else self._polygon_core(*tensors)
        return vector * tensors[1].shape[0]

    def _detection_core(self, boxes, scores, anchor_points, stride_tensor, labels, bboxes, mask):
        """[box, cls, dfl] (3,) and what a vertex term needs; no host sync, static shapes."""
        det = self.det
        # Half precision (AMP) is computed in float32, as DetectionLoss.detection_terms does.
        dtype = torch.promote_types(scores.dtype, torch.float32)
        boxes, scores = boxes.to(dtype), scores.to(dtype)
        b, _, a = scores.shape
        # The fused DFL branch: the expectation for the decode and, below, the cross-entropy at the positives, whose
        # gradient the expectation's backward adds in its one dense write of the logits gradient.
        branch = _kernels.dfl_expectation(boxes, det.reg_max)
        expectation = branch.expectation  # (B, 4, A) grid units; its gradient comes from the box and DFL terms
        pred_bboxes = dist2bbox(expectation.detach().transpose(1, 2), anchor_points, xywh=False)  # (B, A, 4)
        scores_t = scores.transpose(1, 2)
        assignment = task_aligned_assign(
            scores_t.detach().sigmoid(),
            (pred_bboxes * stride_tensor).to(bboxes.dtype),
            anchor_points * stride_tensor,
            labels, bboxes, mask.unsqueeze(-1), det.strides, det.assigner,
        )
        target_score = assignment.target_score  # (B, A): the dense (B, A, nc) targets are never built
        tss = target_score.sum().clamp(min=1)
        cls_term = _kernels.class_bce(scores, assignment.target_labels, target_score) / tss

        index, valid = positive_index(assignment.fg_mask, min(b * a, b * labels.shape[1] * det.assigner.topk))
        image, anchor = index // a, index % a
        # weight * (1 - CIoU) with its gradient, the weights and the DFL targets, fused (filler entries: weight 0).
        box_loss, weight, ltrb = _kernels.positive_boxes(expectation, anchor_points, stride_tensor, index, valid,
                                                         assignment.target_bboxes, target_score[..., None],
                                                         det.reg_max)
        box_term = box_loss.sum() / tss
        dfl_term = (branch.positive_loss(image, anchor, ltrb) * weight).sum() / tss
        g = det.gains
        terms = torch.stack((box_term * g.box, cls_term * g.cls, dfl_term * g.dfl))
        return terms, (assignment, image, anchor, valid, weight, tss)

    def _polygon_core(self, boxes, scores, anchor_points, stride_tensor, labels, bboxes, mask, raw, gt_polygons,
                      gt_polygon_mask, progress):
        """[box, polygon, cls, dfl] (4,); the vertex term as PolygonLoss.terms computes it, over the fixed index."""
        terms, (assignment, image, anchor, valid, weight, tss) = self._detection_core(
            boxes, scores, anchor_points, stride_tensor, labels, bboxes, mask)
        slot = assignment.target_gt_idx[image, anchor]
        stride = stride_tensor[anchor]  # (K, 1)
        pred = positive_vertices(raw, image, anchor, anchor_points, stride_tensor)
        target = gt_polygons[image, slot] / stride.to(gt_polygons.dtype)[:, :, None]
        target = torch.where(valid[:, None, None], target, pred.detach().to(target.dtype))
        vertex_mask = gt_polygon_mask[image, slot] | ~valid[:, None]
        # Without a polygon_mask in the batch every vertex is real: MGIoU then skips its padded-vertex fill (a cummax).
        shape_mask = None if self._all_real else vertex_mask
        box = assignment.target_bboxes[image, anchor] / stride
        area = torch.where(valid, (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]), torch.ones_like(box[:, 0]))
        # The core's targets have a real vertex per polygon (the batch was checked; filler entries get all-real masks)
        # and finite values (range-checked before the core, see losses._bounds).
        per_anchor = vertex_term(pred, target, vertex_mask, area, self.poly.term, progress, self.poly.shape_loss,
                                 shape_mask)
        polygon_term = (per_anchor * weight.to(per_anchor.dtype)).sum() / tss * self.poly.gains.polygon
        dtype = torch.promote_types(terms.dtype, polygon_term.dtype)
        box_t, cls_t, dfl_t = terms.to(dtype).unbind()
        return torch.stack((box_t, polygon_term.to(dtype), cls_t, dfl_t))


def image_size(strides, feats, scores: torch.Tensor) -> torch.Tensor:
    """(h, w) in pixels of feats[0] at strides[0], on the scores' device in float32 at least; built by a kernel
    rather than copied from the host."""
    h, w = feats[0].shape[2:]
    first = torch.arange(2, device=scores.device) == 0
    pair = torch.where(first, float(h * strides[0]), float(w * strides[0]))
    return pair.to(torch.promote_types(scores.dtype, torch.float32))

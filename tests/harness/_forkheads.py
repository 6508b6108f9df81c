"""A Polygon head and its loss written the way an Ultralytics 8.3 fork writes them (clean room: the pattern, not the
code): training returns `(per-level maps, polygons)`, eval `(y, (maps, polygons))`, the vertex count lives in
`poly_shape`, and the loss is built from a model, reading `model.args` and `model.model[-1]`."""

import torch

import heads
import losses


def level_maps(out, x):
    """8.3's per-level (B, 4*reg_max + nc, H, W) maps from the branches' flattened boxes and scores."""
    sizes = [f.shape[-2:] for f in x]
    joined = torch.cat((out["boxes"], out["scores"]), 1)
    return [part.reshape(*part.shape[:2], *hw) for part, hw in zip(joined.split([h * w for h, w in sizes], 2), sizes)]


class Polygon83(heads.Polygon):
    """The reference Polygon's branches, arranged as an 8.3 fork arranges its outputs."""

    def __init__(self, nc=80, poly_shape=(8, 2), ch=()):
        super().__init__(nc=nc, np=poly_shape[0], ch=ch)
        self.poly_shape = tuple(poly_shape)

    def forward(self, x):
        out = self._branch_outputs(x)
        maps = level_maps(out, x)
        if self.training:
            return maps, out["polygons"]
        y = self.decode({"boxes": out["boxes"], "scores": out["scores"], "polygons": out["polygons"],
                         "feats": list(x)})
        return y, (maps, out["polygons"])


class v8PolygonLoss:  # noqa: N801  (named as forks name theirs)
    """A fork's polygon loss: hyperparameters from `model.args`, the head from `model.model[-1]`, predictions as the
    8.3 tuple. Computed with the reference PolygonLoss after unpacking, so its numbers are known."""

    def __init__(self, model):
        head = model.model[-1]
        self.hyp = model.args
        self.nc, self.reg_max, self.np = head.nc, head.reg_max, head.poly_shape[0]
        gains = losses.PolygonGains(box=self.hyp.box, cls=self.hyp.cls, dfl=self.hyp.dfl, polygon=self.hyp.polygon)
        self.inner = losses.PolygonLoss(self.nc, head.stride.tolist(), np=self.np, reg_max=self.reg_max, gains=gains)

    def __call__(self, preds, batch):
        maps, polygons = preds[1] if isinstance(preds[0], torch.Tensor) else preds
        flat = torch.cat([m.flatten(2) for m in maps], 2)
        boxes, scores = flat.split((4 * self.reg_max, self.nc), 1)
        return self.inner({"boxes": boxes, "scores": scores, "feats": maps, "polygons": polygons}, batch)


class Detect83(heads.Detect):
    """Detect in the 8.3 layout: training returns the per-level (B, 4*reg_max + nc, H, W) maps, eval (y, maps)."""

    def forward(self, x):
        out = self._branch_outputs(x)
        maps = level_maps(out, x)
        if self.training:
            return maps
        return self.decode({"boxes": out["boxes"], "scores": out["scores"], "feats": list(x)}), maps


class Polygon83ForgetsPriors(Polygon83):
    """R1 in a fork: its own bias_init sets cv4 and never calls the parent's, so cv3 keeps PyTorch's default bias."""

    def bias_init(self, *args, **kwargs):
        with torch.no_grad():
            for branch in self.cv4:
                branch[-1].bias.zero_()


class v8PolygonLossTensorItems(v8PolygonLoss):  # noqa: N801
    """The same loss returning its items as one detached tensor, as Ultralytics 8.3's losses do."""

    def __call__(self, preds, batch):
        vector, items = super().__call__(preds, batch)
        return vector, torch.stack([items[k] for k in ("box_loss", "polygon_loss", "cls_loss", "dfl_loss")])


class v8PolygonLossWithNames(v8PolygonLossTensorItems):  # noqa: N801
    """... and naming them itself, with a `loss_names` attribute."""

    loss_names = ("box_loss", "polygon_loss", "cls_loss", "dfl_loss")

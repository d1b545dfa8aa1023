"""MTCNN for CPU throughput: facenet-pytorch's weights and three stages, restructured.

The maths are facenet-pytorch's ``detect_face`` (same pyramid, thresholds, NMS,
box regression and landmarks); what changes is how they are computed, because on
CPU its cost is mostly overhead around small tensors:

- every "area" resampling (the P-net pyramid and the per-box 24x24 / 48x48 crops
  for R- and O-net) is read from integer running sums of the batch (down the rows,
  then along the columns of each band of rows): the sums over torch's
  adaptive-average-pool bins are exact, and all boxes of a stage are resampled in
  one gather instead of one ``interpolate`` call per box;
- the nets run in ``channels_last`` (mkldnn's fast layout for conv and the
  ceil-mode max-pooling that dominates R- and O-net).

Against facenet-pytorch's own ``detect`` this gives the same faces with boxes and
landmarks within ~1e-3 px (float rounding; tests/features/test_faces.py checks it).

:meth:`Mtcnn.detect` can also search only *near* a known face: a window around it
and the pyramid scales whose P-net cell matches its size. Inside that window the
P-net inputs are the very values of the full pyramid (same bins, windows aligned to
P-net's stride), so the candidates there are the full search's candidates; what
differs is only which boxes from elsewhere take part in NMS.

:meth:`Mtcnn.confirm` runs O-net alone on given boxes (search="track": the box O-net saw
for the previous frame's face), summing only the rows and columns those boxes cover.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from facenet_pytorch import MTCNN
from facenet_pytorch.models.utils.detect_face import batched_nms_numpy, bbreg, rerec
from torchvision.ops.boxes import batched_nms

THRESHOLDS = (0.6, 0.7, 0.7)  # facenet-pytorch's defaults for P-, R-, O-net
FACTOR = 0.709  # pyramid step, as facenet-pytorch
_CELL = 12  # P-net's window side
_STRIDE = 2  # P-net's output stride


@dataclass(frozen=True)
class Window:
    """A near search: pyramid scales (a subset of the full one) and a region, in detection pixels."""

    scales: tuple[float, ...]
    x0: float
    y0: float
    x1: float
    y1: float


def _bins(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of torch's adaptive_avg_pool bins (what interpolate(mode='area') uses)."""
    i = np.arange(n_out, dtype=np.int64)
    return (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)


class Mtcnn:
    """The three MTCNN nets (facenet-pytorch's VGGFace2 weights) and a batched CPU-friendly detect."""

    def __init__(self, min_face_size: int, device: torch.device) -> None:
        nets = MTCNN(min_face_size=min_face_size, device=device)  # loads the packaged weights
        self.min_face_size = min_face_size
        self.device = device
        self.pnet, self.rnet, self.onet = (net.eval().to(memory_format=torch.channels_last) for net in (nets.pnet, nets.rnet, nets.onet))

    def scales(self, h: int, w: int) -> list[float]:
        """The image pyramid of facenet-pytorch's detect_face for an h x w image."""
        m = _CELL / self.min_face_size
        minl, scale, out = min(h, w) * m, m, []
        while minl >= _CELL:
            out.append(scale)
            scale, minl = scale * FACTOR, minl * FACTOR
        return out

    def detect(self, imgs: torch.Tensor, window: Window | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Faces in (N, h, w, 3) uint8 RGB images: per image (boxes (K, 5) x1 y1 x2 y2 prob, points (K, 5, 2)).

        ``window`` restricts the search of every image to that region and those scales (None: everywhere).
        """
        return [(boxes, points) for boxes, points, _ in self.detect_with_inputs(imgs, window)]

    @torch.no_grad()
    def detect_with_inputs(self, imgs: torch.Tensor, window: Window | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`detect`, each face also with the box O-net saw (K, 4) before its box regression: what
        :meth:`confirm` takes to find the same face again in the next frame."""
        n, h, w = imgs.shape[:3]
        rowsum = _rowsum(imgs)
        boxes, inds = self._stage1(rowsum, h, w, window)
        if len(boxes):  # the crops' bins differ per box: a 2-D summed-area table, read at 4 corners per bin
            table = _colsum(rowsum).reshape(-1, 3)  # (N * (h+1) * (w+1), 3)
        else:
            table = torch.zeros((0, 3), dtype=torch.int32)
        boxes, inds = self._refine(table, h, w, boxes, inds, 24)
        boxes, inds, points, inputs = self._refine(table, h, w, boxes, inds, 48)
        boxes_np, points_np, inputs_np, inds_np = boxes.cpu().numpy(), points.cpu().numpy(), inputs.cpu().numpy(), inds.cpu().numpy()
        return [(boxes_np[inds_np == i], points_np[inds_np == i], inputs_np[inds_np == i]) for i in range(n)]

    @torch.no_grad()
    def confirm(self, img: torch.Tensor, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """O-net alone (no P-net, no R-net) on candidate boxes (K, 4) of one (h, w, 3) uint8 image: the faces it
        confirms as :meth:`detect_with_inputs` gives them for one image. The candidates are cropped and treated
        exactly as R-net's squared boxes are in :meth:`detect` (same 48 px area resampling, threshold, box
        regression, NMS); only the rows and columns they cover are summed."""
        h, w = img.shape[:2]
        boxes = torch.from_numpy(np.asarray(candidates, np.float32).reshape(-1, 4))
        b = boxes.trunc().int()
        # The crops read rows [y1 - 1, y2) and columns [x1 - 1, x2) clipped to the image: sum only those.
        r0, r1 = max(0, int(b[:, 1].min()) - 1), min(h, int(b[:, 3].max()))
        c0, c1 = max(0, int(b[:, 0].min()) - 1), min(w, int(b[:, 2].max()))
        if r1 <= r0 or c1 <= c0:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros((0, 4), np.float32)
        # Shifting by whole pixels towards the origin keeps trunc() and the clipping at 1 and at the far
        # edge as they are in the whole image (r0 > 0 only when every box starts below row 1, etc.).
        shift = torch.tensor([c0, r0, c0, r0], dtype=torch.float32)
        table = _colsum(_rowsum(img[None, r0:r1, c0:c1])).reshape(-1, 3)
        boxes = torch.cat([boxes - shift, torch.ones((len(boxes), 1))], dim=1)  # the score column O-net replaces
        inds = torch.zeros(len(boxes), dtype=torch.int64)
        boxes, _, points, inputs = self._refine(table, r1 - r0, c1 - c0, boxes, inds, 48)
        boxes[:, :4] += shift
        points += shift[:2]
        inputs += shift
        return boxes.cpu().numpy(), points.cpu().numpy(), inputs.cpu().numpy()

    # ------------------------------------------------------------------ stages

    def _stage1(self, rowsum: torch.Tensor, h: int, w: int, window: Window | None) -> tuple[torch.Tensor, torch.Tensor]:
        images = list(range(len(rowsum)))
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for scale in self.scales(h, w):
            hs, ws = int(h * scale + 1), int(w * scale + 1)
            if window is None:
                parts.append(self._pnet(rowsum, images, h, w, hs, ws, (0, hs), (0, ws), scale))
            elif any(abs(scale - s) < 1e-9 for s in window.scales):
                rows = _aligned(window.y0 * scale, window.y1 * scale, hs)
                cols = _aligned(window.x0 * scale, window.x1 * scale, ws)
                if rows[1] - rows[0] >= _CELL and cols[1] - cols[0] >= _CELL:
                    parts.append(self._pnet(rowsum, images, h, w, hs, ws, rows, cols, scale))
        if not parts:
            return torch.zeros((0, 5)), torch.zeros(0, dtype=torch.int64)
        # NMS within each (scale, image) part, then across scales within each image.
        kept = [(b[p], i[p]) for b, i in parts for p in [batched_nms(b[:, :4], b[:, 4], i, 0.5)]]
        boxes, inds = torch.cat([b for b, _ in kept]), torch.cat([i for _, i in kept])
        pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
        boxes, inds = boxes[pick], inds[pick]
        regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        qq = torch.stack(
            [
                boxes[:, 0] + boxes[:, 5] * regw,
                boxes[:, 1] + boxes[:, 6] * regh,
                boxes[:, 2] + boxes[:, 7] * regw,
                boxes[:, 3] + boxes[:, 8] * regh,
                boxes[:, 4],
            ],
            dim=1,
        )
        return rerec(qq), inds

    def _pnet(
        self,
        rowsum: torch.Tensor,
        images: list[int],
        h: int,
        w: int,
        hs: int,
        ws: int,
        rows: tuple[int, int],
        cols: tuple[int, int],
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """P-net on rows x cols of the (hs, ws) pyramid level of ``images``; candidate boxes (M, 9) and image index."""
        ra, rb = (torch.from_numpy(b[rows[0] : rows[1]]) for b in _bins(h, hs))
        ca, cb = (torch.from_numpy(b[cols[0] : cols[1]]) for b in _bins(w, ws))
        idx = torch.tensor(images, dtype=torch.int64)
        part = rowsum if len(images) == len(rowsum) else rowsum.index_select(0, idx)
        lo, hi = int(ca[0]), int(cb[-1])  # only the columns this region's bins read
        band = (part.index_select(1, rb) - part.index_select(1, ra))[:, :, lo:hi]  # (k, OH, hi-lo, 3) row-bin sums
        colsum = _colsum(band)
        sums = colsum.index_select(2, cb - lo) - colsum.index_select(2, ca - lo)  # (k, OH, OW, 3)
        x = _normalise(sums, (rb - ra)[:, None] * (cb - ca)[None, :])
        reg, probs = self.pnet(x)  # (k, 4, fh, fw), (k, 2, fh, fw)
        probs = probs[:, 1]
        mask = probs >= THRESHOLDS[0]
        found = mask.nonzero()  # (M, 3): image, y, x in the region's feature map
        score = probs[mask]
        regs = reg.permute(0, 2, 3, 1)[mask]  # (M, 4)
        # The region starts on a stride boundary, so its feature cell j is the pyramid's cell j + start / stride.
        bb = torch.stack([found[:, 2] + cols[0] // _STRIDE, found[:, 1] + rows[0] // _STRIDE], 1).to(reg.dtype)
        q1 = ((_STRIDE * bb + 1) / scale).floor()
        q2 = ((_STRIDE * bb + _CELL - 1 + 1) / scale).floor()
        return torch.cat([q1, q2, score.unsqueeze(1), regs], dim=1), idx[found[:, 0]]

    def _refine(self, table: torch.Tensor, h: int, w: int, boxes: torch.Tensor, inds: torch.Tensor, size: int):
        """R-net (size 24) or O-net (size 48, which also gives landmarks) on the candidate boxes.

        ``table``: the batch's summed-area table, flattened to (N * (h+1) * (w+1), 3).
        """
        if len(boxes) == 0:
            empty = (torch.zeros((0, 5)), torch.zeros(0, dtype=torch.int64))
            return (*empty, torch.zeros((0, 5, 2)), torch.zeros((0, 4))) if size == 48 else empty
        b = boxes[:, :4].trunc().int()
        x, y = b[:, 0].clamp(min=1), b[:, 1].clamp(min=1)
        ex, ey = b[:, 2].clamp(max=w), b[:, 3].clamp(max=h)
        valid = (ey > y - 1) & (ex > x - 1)  # facenet-pytorch skips empty crops the same way
        boxes, inds, x, y, ex, ey = boxes[valid], inds[valid], x[valid], y[valid], ex[valid], ey[valid]
        # Crop rows [y - 1, ey) and columns [x - 1, ex) (clipped, not padded), area-resampled to size x size.
        i = torch.arange(size, dtype=torch.int64)
        hk, wk = (ey - y + 1).long()[:, None], (ex - x + 1).long()[:, None]
        y0, x0 = (y - 1).long()[:, None], (x - 1).long()[:, None]
        ra, rb = y0 + (i * hk) // size, y0 - ((-(i + 1) * hk) // size)
        ca, cb = x0 + (i * wk) // size, x0 - ((-(i + 1) * wk) // size)
        base = (inds * ((h + 1) * (w + 1)))[:, None, None]
        r0, r1 = (ra * (w + 1))[:, :, None], (rb * (w + 1))[:, :, None]
        c0, c1 = ca[:, None, :], cb[:, None, :]

        def corner(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (K, size, size, 3)
            return table.index_select(0, (base + r + c).reshape(-1)).view(len(inds), size, size, 3)

        sums = corner(r1, c1) - corner(r0, c1) - corner(r1, c0) + corner(r0, c0)
        crops = _normalise(sums, (rb - ra)[:, :, None] * (cb - ca)[:, None, :])  # (K, 3, size, size)
        net = self.rnet if size == 24 else self.onet
        out = net(crops)
        score = out[-1][:, 1]
        ipass = score > THRESHOLDS[1 if size == 24 else 2]
        boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
        inds, mv = inds[ipass], out[0][ipass]
        if size == 24:
            pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
            return rerec(bbreg(boxes[pick], mv[pick])), inds[pick]
        points = out[1][ipass]  # (K, 10): 5 x, then 5 y, relative to the box
        w_i, h_i = boxes[:, 2:3] - boxes[:, 0:1] + 1, boxes[:, 3:4] - boxes[:, 1:2] + 1
        px = w_i * points[:, :5] + boxes[:, 0:1] - 1
        py = h_i * points[:, 5:] + boxes[:, 1:2] - 1
        points = torch.stack((px, py), dim=2)  # (K, 5, 2)
        inputs = boxes[:, :4].clone()  # what O-net saw, before its own box regression
        boxes = bbreg(boxes, mv)
        pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], inds, 0.7, "Min")
        return boxes[pick], inds[pick], points[pick], inputs[pick]


def _aligned(lo: float, hi: float, n: int) -> tuple[int, int]:
    """[lo, hi) widened to whole pixels, starting on a P-net stride boundary, within [0, n).

    The length is kept even unless the region reaches the far edge, so that P-net's
    ceil-mode pooling sees partial windows only where the full level has them too.
    """
    start = max(0, int(np.floor(lo)) // _STRIDE * _STRIDE)
    stop = min(n, int(np.ceil(hi)))
    if stop < n and (stop - start) % 2:
        stop += 1
    return start, stop


def _rowsum(imgs: torch.Tensor) -> torch.Tensor:
    """(N, h, w, 3) uint8 -> (N, h + 1, w, 3) running sums down the rows, starting at 0 (exact in int32:
    h * 255 is far below 2**31); every area resampling is a difference of two of its rows, then the same
    along columns."""
    n, h, w = imgs.shape[:3]
    if h * w * 255 >= 2**31:
        raise ValueError(f"detection images of {w}x{h} are too large for int32 running sums; detect at a smaller size")
    rowsum = torch.zeros((n, h + 1, w, 3), dtype=torch.int32, device=imgs.device)
    rowsum[:, 1:] = imgs.cumsum(1, dtype=torch.int32)
    return rowsum


def _colsum(band: torch.Tensor) -> torch.Tensor:
    """(K, R, C, 3) -> (K, R, C + 1, 3) running sums along the columns, starting at 0 (int32: exact
    while R * C * 255 < 2**31, which detect checks for whole images)."""
    out = torch.zeros((*band.shape[:2], band.shape[2] + 1, 3), dtype=band.dtype)
    out[:, :, 1:] = band.cumsum(2, dtype=band.dtype)
    return out


def _normalise(sums: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Bin sums (K, OH, OW, 3) and pixel counts (broadcastable to (K, OH, OW)) -> MTCNN input
    (K, 3, OH, OW) float32 in channels_last memory: the mean, scaled to about [-1, 1] as facenet-pytorch does."""
    mean = (sums.double() / count.unsqueeze(-1)).float()
    return ((mean - 127.5) * 0.0078125).permute(0, 3, 1, 2)

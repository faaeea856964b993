"""Host time of the cuDNN band operator and of its pieces (8k tokens, 16 heads × 64, 8 dilated ×4, window 256).

Needs NVIDIA's cudnn frontend unpacked in /tmp/cdnn (see scripts/gpu_cudnn_causal_band.py):

    python3 scripts/gpu_cudnn_host.py
"""
import sys
import time
sys.path.insert(0, "/tmp/cdnn"); sys.path.insert(0, "src")
import torch
from sadiffuseq.attention import cudnn_band as cb
L, H, D, w = 8192, 16, 64, 256
x = torch.randn(3, 1, L, H, D, device="cuda", dtype=torch.bfloat16)
q, k, v = x[0], x[1], x[2]
spec = [0, 8, 1, 8, 8, 4]
out, lse = cb._forward(q, k, v, w, 0.125, spec)
def host(name, fn, n=50):
    fn(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n): fn()
    t1 = (time.perf_counter() - t) / n * 1e3
    torch.cuda.synchronize(); t2 = (time.perf_counter() - t) / n * 1e3
    print(f"{name}: host {t1:.3f} ms, queued {t2:.3f} ms", flush=True)
host("_forward direct", lambda: cb._forward(q, k, v, w, 0.125, spec))
host("op", lambda: torch.ops.sadiffuseq.cudnn_band_forward(q, k, v, w, 0.125, spec))
qg = cb._group_view(q, 0, 8, 1); kg = cb._group_view(k, 0, 8, 1)
o1 = torch.empty_like(qg); l1 = torch.empty(1, 8, L, device="cuda")
host("one main _call", lambda: cb._call(qg, kg[:, w:], kg[:, w:], o1, l1, 2 * w + 1, 0, 0.125))
data = {"q": qg, "k": kg[:, w:], "v": kg[:, w:], "out": o1, "lse": l1}
gr = cb._graph(False, cb._layout(data), 2 * w + 1, 0, True, 0.125, q.dtype, 0)
host("graph.run", lambda: gr.run(data))
pack = {gr.slots[n]: t for n, t in data.items()}
pack.update({gr.slots[n]: torch.full((B, 1, 1, 1), m, dtype=torch.int32, device="cuda") for n, (B, m) in gr.lengths.items()})
workspace = torch.empty(gr.workspace_size, dtype=torch.uint8, device="cuda")
host("execute", lambda: gr.graph.execute(pack, workspace, handle=gr.handle))
order = list(pack)  # the frontend's ordered binding: buffers by position, their uids given once
uids, buffers = [t.uid for t in order], [pack[t] for t in order]
host("execute, ordered buffers", lambda: gr.graph.execute(buffers, workspace, handle=gr.handle, tensor_uids=uids))
host("layout+lookup", lambda: cb._graph(False, cb._layout(data), 2 * w + 1, 0, True, 0.125, q.dtype, 0))
c = torch.empty(1, 2 * w, 8, D, device="cuda", dtype=torch.bfloat16); lc = torch.empty(1, 8, 2 * w, device="cuda")
host("corner _call", lambda: cb._call(qg[:, :2 * w], kg[:, :w], kg[:, :w], c, lc, w + 1, None, 0.125))
host("corner merge (PyTorch)", lambda: cb._merge_corner_torch(o1[:, :2 * w], l1[..., :2 * w], c, lc))
host("corner merge (Triton)", lambda: cb._merge_corner(o1[:, :2 * w], l1[..., :2 * w], c, lc))
dout = torch.randn_like(q)
host("backward op", lambda: torch.ops.sadiffuseq.cudnn_band_backward(dout, q, k, v, out, lse, w, 0.125, spec))

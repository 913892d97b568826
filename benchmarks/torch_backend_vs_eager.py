"""torch backend vs eager PyTorch, loss + backward, interleaved medians on 1 thread:
    python benchmarks/torch_backend_vs_eager.py forward_kl,reverse_kl,jsd
(the small-shape check of docs/BENCHMARKS.md, "The torch backend")."""
import sys, time, torch
sys.path.insert(0, __import__("os").path.dirname(__file__))
from _bench_providers import eager_kd_loss
import kd_kernels
torch.set_num_threads(1)
def bench(f, reps):
    ts=[]
    for _ in range(reps):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    ts.sort(); return ts[len(ts)//2]*1e3
for div in sys.argv[1].split(","):
  for dt in (torch.float32, torch.bfloat16):
    for n,v in ((16,32000),(256,32000),(16,8000)):
        s=torch.randn(n,v).to(dt); t=torch.randn(n,v).to(dt)
        def e():
            x=s.clone().requires_grad_(); eager_kd_loss(x,t,div).backward()
        def k():
            x=s.clone().requires_grad_(); kd_kernels.kd_loss(x,t,divergence=div,backend="torch").backward()
        e();k()
        te=[];tk=[]
        for r in range(5):
            te.append(bench(e,5)); tk.append(bench(k,5))
        te=sorted(te)[2]; tk=sorted(tk)[2]
        print(f"{div:16s} {str(dt):15s} {n:4d}x{v:6d} eager {te:7.2f} torch {tk:7.2f} ratio {te/tk:.2f}", flush=True)

"""Where the time of one batch-1 forward of a static DeiT-S plan at 0.35 goes, by aten op family
(torch.profiler, CPU, 2 threads): `python benchmarks/profile_batch1.py`."""
import torch, timm, ltmp_core, collections
from torch.profiler import profile, ProfilerActivity
torch.set_num_threads(2)
torch.manual_seed(0)
m = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
g = ltmp_core.ViTGeometry.from_model(m)
keeps = ltmp_core.budgets_for_ratio(["merge+prune"]*12, [1.0]*12, g, 0.35)
import copy
r = ltmp_core.apply_plan(copy.deepcopy(m), ltmp_core.make_plan(m, op="merge+prune", keep=keeps, importance="cls"), mode="static")
x = torch.randn(1, 3, 224, 224)
with torch.inference_mode():
    for _ in range(5): m(x); r(x)
    import time
    def t(f):
        ts=[]
        for _ in range(15):
            s=time.perf_counter(); f(x); ts.append(time.perf_counter()-s)
        return sorted(ts)[7]
    tb, tr = t(m), t(r)
    print(f"base {tb*1e3:.1f} ms, plan {tr*1e3:.1f} ms, speedup {tb/tr:.2f}, ratio {ltmp_core.count_flops(r)/ltmp_core.unreduced_macs(g):.3f}, of ideal {tb/tr*ltmp_core.count_flops(r)/ltmp_core.unreduced_macs(g):.2f}")
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(10): r(x)
fam = collections.Counter(); calls = collections.Counter()
for e in p.key_averages():
    name = e.key
    if name.startswith("aten::") :
        f = ("gemm" if any(k in name for k in ("addmm","mm","linear","bmm","matmul","scaled_dot")) else
             "topk/sort" if any(k in name for k in ("topk","sort","argsort")) else
             "gather/scatter/index" if any(k in name for k in ("gather","scatter","index","take")) else
             "norm/softmax/gelu" if any(k in name for k in ("layer_norm","softmax","gelu","norm")) else "other elementwise/alloc")
        fam[f] += e.self_cpu_time_total; calls[f] += e.count
tot = sum(fam.values())
for f,v in fam.most_common():
    print(f"{f:28s} {100*v/tot:5.1f}%  {calls[f]/10:6.0f} calls/forward  {v/10/1e3:6.2f} ms/forward")
print()
rows = sorted([e for e in p.key_averages() if e.key.startswith("aten::")], key=lambda e: -e.count)[:15]
for e in rows:
    print(f"{e.key:32s} {e.count/10:6.0f} calls/fwd  self {e.self_cpu_time_total/10/1e3:6.2f} ms")

"""Time one S5Net training step (batch 512, random data) in fp32 and bf16 autocast, with and
without channels_last: the measurement behind --precision auto. python scripts/step_probe.py"""
import time, torch, torch.nn.functional as F
from trainkit.models import S5Net
torch.manual_seed(0)
x = torch.randn(512,1,28,28); y = torch.randint(0,10,(512,))
for cl in (False, True):
  for dt in (None, torch.bfloat16):
    m = S5Net()
    xx = x
    if cl: m = m.to(memory_format=torch.channels_last); xx = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dt is not None):
            loss = F.nll_loss(m(xx).float(), y)
        opt.zero_grad(); loss.backward(); opt.step()
    for _ in range(2): step()
    t=time.perf_counter(); 
    for _ in range(5): step()
    print('channels_last', cl, 'bf16', dt is not None, (time.perf_counter()-t)/5)

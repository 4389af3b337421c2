"""regnet_x_400mf at 32x32, CIFAR-10 10k subset: train 2 epochs (cached), then compress flops=2x budget 1
(default dims) and report widths, NCHWc convs and onnxruntime speed. argv: tag."""
import sys, time, os, torch, torchvision, torch.nn.functional as F
from torch.utils.data import TensorDataset, DataLoader
import autocompress
from autocompress.data import get_dataset
from autocompress.latency import blocked_convolutions
torch.manual_seed(0)
tag = sys.argv[1]
ds = get_dataset("cifar10", "/work/shared/datasets/cifar10-jpeg.tar.gz", max_train=10000, max_test=2000, val_size=2000)
mean = torch.tensor(ds.mean).view(1, 3, 1, 1); std = torch.tensor(ds.std).view(1, 3, 1, 1)
norm = lambda s: ((s.images.float() / 255 - mean) / std, s.labels)
(xtr, ytr), (xva, yva), (xte, yte) = norm(ds.train), norm(ds.val), norm(ds.test)
tr = DataLoader(TensorDataset(xtr, ytr), batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
va = DataLoader(TensorDataset(xva, yva), batch_size=256)
def acc(m, xs, ys):
    m.eval()
    with torch.no_grad():
        return 100 * sum((m(xs[i:i+500]).argmax(1) == ys[i:i+500]).sum().item() for i in range(0, len(ys), 500)) / len(ys)
m = torchvision.models.regnet_x_400mf(num_classes=10)
path = "/work/scratch/regnet_base.pt"
if os.path.exists(path):
    m.load_state_dict(torch.load(path))
else:
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=3 * len(tr))
    for ep in range(3):
        m.train()
        for x, y in tr:
            opt.zero_grad(); F.cross_entropy(m(x), y).backward(); opt.step(); sched.step()
        print("epoch", ep, "val", acc(m, xva, yva), flush=True)
    torch.save(m.state_dict(), path)
m.eval()
x1 = torch.randn(1, 3, 32, 32)
print("base val", acc(m, xva, yva), "test", acc(m, xte, yte), "NCHWc", blocked_convolutions(m, x1), flush=True)
t = time.time()
res = autocompress.compress(m, x1, "flops=2x", train_loader=tr, val_loader=va, config={"budget": 1},
                            device="cpu", progress=False, log=print)
print("time", time.time() - t)
print(res.summary())
small = res.deployed_model
print(tag, "test", acc(res.model, xte, yte), "NCHWc", blocked_convolutions(small, x1), flush=True)

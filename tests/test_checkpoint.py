"""Checkpoint and resume: a DFP16-trained model (FP32 master weights, BatchNorm buffers) and
its optimizer state (SGD momentum) saved after K steps and loaded into a fresh model in a
fresh process continue to the same bits as an uninterrupted run (exact mode)."""
import subprocess
import sys
import textwrap

import torch
from torch import nn

K, M = 2, 2

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    import torch.nn.functional as F
    from torch import nn
    import dfpgen.runtime as dfp

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(8 * 4 * 4, 4))
        dfp.convert(model, overflow="exact")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return model, opt

    def train(model, opt, start, stop):
        for i in range(start, stop):
            g = torch.Generator().manual_seed(500 + i)
            x, y = torch.randn(5, 2, 8, 8, generator=g), torch.randint(0, 4, (5,), generator=g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    if __name__ == "__main__":
        ckpt, start, stop, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        torch.set_num_threads(1)
        model, opt = make()
        state = torch.load(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        train(model, opt, start, stop)
        torch.save(model.state_dict(), out)
''')

_ns = {}
exec(compile(SCRIPT, "<checkpoint>", "exec"), _ns)


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    torch.set_num_threads(1)
    model, opt = _ns["make"]()
    _ns["train"](model, opt, 0, K)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ckpt)
    assert torch.load(ckpt)["optimizer"]["state"], "momentum buffers are part of the checkpoint"

    script = tmp_path / "resume.py"
    script.write_text(SCRIPT)
    out = tmp_path / "resumed.pt"
    r = subprocess.run([sys.executable, str(script), str(ckpt), str(K), str(K + M), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    resumed = torch.load(out)

    _ns["train"](model, opt, K, K + M)  # the uninterrupted run
    full = model.state_dict()
    assert resumed.keys() == full.keys()
    for k in full:
        assert torch.equal(resumed[k], full[k]), k
    at_k = torch.load(ckpt)["model"]
    assert not torch.equal(full["0.weight"], at_k["0.weight"])  # the last M steps did train


def test_resume_without_optimizer_state_differs(tmp_path):
    # The test above can fail: dropping the momentum buffers changes the continued weights.
    torch.set_num_threads(1)
    model, opt = _ns["make"]()
    _ns["train"](model, opt, 0, K)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _ns["train"](model, opt, K, K + M)
    fresh, fresh_opt = _ns["make"]()
    fresh.load_state_dict(state)
    _ns["train"](fresh, fresh_opt, K, K + M)
    assert not torch.equal(fresh.state_dict()["0.weight"], model.state_dict()["0.weight"])


def test_dfp_checkpoint_loads_into_plain_pytorch_layers():
    model, _ = _ns["make"]()
    plain = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    plain.load_state_dict(model.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])
        assert v.dtype == model.state_dict()[k].dtype
    assert model[0].weight.dtype == torch.float32  # FP32 master weights

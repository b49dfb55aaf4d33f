"""Started by tests/test_training.py under torchrun: two processes train one model data-parallel on CPU (gloo)."""

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from memorycore.training import fit_model  # noqa: E402

torch.manual_seed(0)
x = torch.randn(256, 4)
y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
model = nn.Linear(4, 1)
history = fit_model(model, lambda m, b: (m(b[0]).squeeze(-1) - b[1]).square().mean(), TensorDataset(x[:192], y[:192]),
                    TensorDataset(x[192:], y[192:]), epochs=6, batch_size=16, lr=0.1, devices=2, device="cpu",
                    verbose=False)
result = {"rank": int(os.environ["RANK"]), "weight": model.weight.detach().flatten().tolist(),
          "val_loss": history.val_loss}
Path(sys.argv[1], f"rank{result['rank']}.json").write_text(json.dumps(result))

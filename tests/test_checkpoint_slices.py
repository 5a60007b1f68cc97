"""Weight loaders read only their slice of a checkpoint tensor: CheckpointTensor's narrow
and indexing must equal the same slices of the fully read tensor."""
import torch

from raylm.models.loader import CheckpointTensor, iter_safetensors, materialize


def test_slices_equal_the_full_tensor(tiny_llama):
    seen = 0
    for name, t in iter_safetensors(str(tiny_llama)):
        assert isinstance(t, CheckpointTensor)
        full = t.full()
        assert t.shape == full.shape and torch.equal(materialize(t), full)
        rows = full.shape[0]
        assert torch.equal(t.narrow(0, rows // 2, rows - rows // 2), full[rows // 2:])
        assert torch.equal(t[1:3], full[1:3])
        if full.dim() == 2:
            cols = full.shape[1]
            assert torch.equal(t.narrow(1, cols // 4, cols // 2),
                               full[:, cols // 4: cols // 4 + cols // 2])
            seen += 1
    assert seen > 5


def test_keep_skips_tensors_unread(tiny_llama):
    names = [n for n, _ in iter_safetensors(str(tiny_llama), keep=lambda n: ".layers.1." in n)]
    assert names and all(".layers.1." in n for n in names)

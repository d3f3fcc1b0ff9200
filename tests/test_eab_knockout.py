"""experiments/eab_knockout.py: the copy with every EAB's last convolution at zero computes what
the same network without EAB computes, and nothing else of the checkpoint changes."""
import pytest
import torch

from conftest import small_sdt2net
from experiments import eab_knockout
from models.checkpoint import EAB_LAST_CONV, eab_last_conv_rms


def test_knocked_out_checkpoint_computes_the_network_without_eab(tmp_path, capsys):
    trained = small_sdt2net().eval()  # EAB and FTF with random (trained-like) weights
    path, out = tmp_path / 'checkpoint.pth', tmp_path / 'no_eab.pth'
    torch.save({'model': trained.state_dict(), 'epoch': 4}, path)
    assert eab_knockout.main([str(path), str(out)]) == 0
    assert 'RMS per block' in capsys.readouterr().out

    copy = torch.load(out, weights_only=True)
    assert copy['epoch'] == 4
    knocked = small_sdt2net(trained_like=False).eval()
    knocked.load_state_dict(copy['model'])
    without_eab = small_sdt2net(trained_like=False, eab=False).eval()
    missing, unexpected = without_eab.load_state_dict(copy['model'], strict=False)
    assert not missing and unexpected and all('.eab.' in name for name in unexpected)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(knocked(images), without_eab(images), atol=1e-5)
        assert not torch.allclose(trained(images), knocked(images), atol=1e-3)  # the EABs carried something
    changed = {name for name, value in trained.state_dict().items() if not torch.equal(value, copy['model'][name])}
    assert changed and all(EAB_LAST_CONV.match(name) for name in changed)

    rms = eab_last_conv_rms(trained.state_dict())
    assert sorted(rms) == list(range(len(trained.blocks))) and all(v > 0.05 for v in rms.values())
    assert set(eab_last_conv_rms(copy['model']).values()) == {0.0}


@pytest.mark.parametrize('same_path', [False, True])
def test_refuses_a_model_without_eab_and_its_own_path(tmp_path, capsys, same_path):
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': small_sdt2net(eab=False).state_dict()}, path)
    out = path if same_path else tmp_path / 'copy.pth'
    assert eab_knockout.main([str(path), str(out)]) != 0
    error = capsys.readouterr().err
    assert ('overwrite' if same_path else 'no EAB') in error and 'Traceback' not in error
    assert not (tmp_path / 'copy.pth').exists()

"""featmatch._hooks: the hook an SAE reads and the block a hook belongs to."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from _builders import jumprelu_sae

from featmatch._hooks import block_index, hook_name, shift_block
from featmatch.saes import weights


def test_hook_name_sources_in_order():
    sae = jumprelu_sae(hook_name="blocks.3.hook_resid_post")
    assert hook_name(sae) == hook_name(sae, 7) == "blocks.3.hook_resid_post"
    assert hook_name(weights(sae)) == "blocks.3.hook_resid_post"  # SAEWeights.hook_name
    old_style = SimpleNamespace(cfg=SimpleNamespace(hook_name="blocks.1.hook_resid_pre"))
    assert hook_name(old_style) == "blocks.1.hook_resid_pre"  # cfg.hook_name (older SAELens)
    sae.cfg.metadata.hook_name = None
    assert hook_name(sae, 2) == "blocks.2.hook_resid_post"
    assert hook_name(object(), 0) == "blocks.0.hook_resid_post"
    with pytest.raises(ValueError, match="no cfg.metadata.hook_name"):
        hook_name(sae)


@pytest.mark.parametrize(
    "hook,index",
    [
        ("blocks.0.hook_resid_post", 0),
        ("blocks.12.attn.hook_z", 12),
        ("hook_embed", None),
        ("ln_final.hook_normalized", None),
        ("blocks.x.hook", None),
    ],
)
def test_block_index(hook, index):
    assert block_index(hook) == index


def test_shift_block():
    assert shift_block("blocks.3.hook_resid_post") == "blocks.4.hook_resid_post"
    assert shift_block("blocks.10.hook_mlp_out", -2) == "blocks.8.hook_mlp_out"
    with pytest.raises(ValueError, match="cannot find a block index"):
        shift_block("hook_embed")

"""Weight-decay groups: biases, norms and declared tokens/position tables are not decayed."""
import torch
from torch import nn

from mmm.config import OptimConfig, load_config
from mmm.train.module import MaskedModelingModule
from mmm.train.param_groups import no_weight_decay_names, weight_decay_groups
from mmm.train.pretrain import build_model_for
from mmm.train.tasks import prepare_run_assets


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_mae_model_exempts_cls_mask_and_learned_positions(tmp_path):
    cfg = load_config("configs/image_mae_tiny.yaml", {"trainer.default_root_dir": str(tmp_path),
                                                       "model.image.position": "learned"})
    model = build_model_for(cfg, prepare_run_assets(cfg))
    decay, no_decay = (_names(model, g) for g in weight_decay_groups(model, 0.05))
    for name in ("embedders.image.cls_token", "embedders.image.mask_token", "embedders.image.pos_embed",
                 "objectives.mae.mask_token"):
        assert name in no_decay, name
    assert "embedders.image.patch_embed.proj.weight" in decay
    assert "objectives.mae.decoder_embed.weight" in decay
    assert not any(n.endswith(".bias") for n in decay)  # every bias is 1-D
    assert decay | no_decay == {n for n, _ in model.named_parameters()}
    assert not decay & no_decay


def test_text_positions_exempt_token_table_decayed():
    from mmm.core.position import AbsolutePositions

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = nn.Embedding(10, 4)
            self.positions = AbsolutePositions("learned", 8, 4)
            self.norm_like_name = nn.Linear(4, 4)  # a 2-D weight whose name says "norm": still decayed
            self.ln = nn.LayerNorm(4)

    toy = Toy()
    assert no_weight_decay_names(toy) == {"positions.weight"}
    decay, no_decay = (_names(toy, g) for g in weight_decay_groups(toy, 0.1))
    assert decay == {"tokens.weight", "norm_like_name.weight"}
    assert no_decay == {"positions.weight", "norm_like_name.bias", "ln.weight", "ln.bias"}


def test_optimizer_uses_the_groups(tmp_path):
    cfg = load_config("configs/image_mae_tiny.yaml", {"trainer.default_root_dir": str(tmp_path)})
    model = build_model_for(cfg, prepare_run_assets(cfg))
    module = MaskedModelingModule(model, OptimConfig(weight_decay=0.05), max_steps=10)
    opt = module.configure_optimizers()["optimizer"]
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    cls_token = model.embedders["image"].cls_token
    assert id(cls_token) in by_decay[0.0] and id(model.embedders["image"].patch_embed.proj.weight) in by_decay[0.05]
    assert isinstance(cls_token, torch.nn.Parameter)

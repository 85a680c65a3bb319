"""Modality experts (VLMo / ONE-PEACE): shared attention, one MLP per modality, routed by each token's modality."""
import copy
import re

import pytest
import torch

from mmm.batch import ImageInput, PackedBatch, TokenInput
from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig
from mmm.core.encoder import TransformerEncoder, fold_modality_experts
from mmm.core.packing import PackedSeqInfo
from mmm.model import build_model
from mmm.modalities.image.embedder import ImageEmbedder, ImageEncoder
from mmm.registry import EMBEDDERS

D = 32


def _cfg(**kw):
    return EncoderConfig(**{**dict(dim=D, depth=2, heads=2, mlp_hidden=64, norm_first=True, final_norm=True,
                                   norm_eps=1e-6, dropout=0.0, attn_dropout=0.0, attention="math"), **kw})


def _reference(enc: TransformerEncoder, x, seq, route):
    """Every expert on every token, then each token keeps its own modality's result (pre-LN blocks)."""
    for block in enc.blocks:
        x = x + block.attn(block.norm1(x), seq, "math", None, None)
        h = block.norm2(x)
        outs = torch.stack([expert(h) for expert in block.mlp.experts])  # (E, N, d)
        x = x + outs.gather(0, route[None, :, None].expand(1, -1, D))[0]
    return enc.final_norm(x)


def test_each_token_passes_only_its_modalitys_mlp():
    torch.manual_seed(0)
    enc = TransformerEncoder(_cfg(), experts=3)
    assert len(enc.blocks[0].mlp.experts) == 3
    seq = PackedSeqInfo.from_seqlens([5, 4])
    x = torch.randn(9, D)
    route = torch.tensor([0, 0, 2, 2, 0, 1, 1, 2, 0])
    assert torch.allclose(enc(x, seq, modality=route), _reference(enc, x, seq, route), atol=1e-5)
    # one modality everywhere: an int routes like a constant tensor
    assert torch.allclose(enc(x, seq, modality=1), enc(x, seq, modality=torch.ones(9, dtype=torch.long)), atol=1e-6)
    with pytest.raises(ValueError, match="modality"):
        enc(x, seq)


def test_outputs_of_one_modality_never_touch_the_other_experts():
    torch.manual_seed(0)
    enc = TransformerEncoder(_cfg(depth=1), experts=2)  # one block: nothing mixes tokens after the MLP
    seq = PackedSeqInfo.from_seqlens([6])
    x = torch.randn(6, D)
    route = torch.tensor([0, 1, 0, 1, 1, 0])
    out = enc(x, seq, modality=route)
    # a fixed random read-out: a plain sum of a LayerNorm-ed output is constant (zero gradient)
    (out[route == 0] * torch.randn(out[route == 0].shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    experts = enc.blocks[0].mlp.experts
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in experts[0].parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in experts[1].parameters())
    with torch.no_grad():  # changing expert 1 changes only the outputs of modality 1's tokens
        for p in experts[1].parameters():
            p.add_(1.0)
        changed = enc(x, seq, modality=route)
    assert torch.equal(changed[route == 0], out[route == 0].detach())
    assert not torch.allclose(changed[route == 1], out[route == 1].detach())


def _model():
    torch.manual_seed(0)
    text = EMBEDDERS.create("text", vocab_size=30, dim=D, max_len=16, dropout=0.0, pad_id=0)
    image = ImageEmbedder(D, image_size=8, patch_size=4, cls_token=True, position="sincos")
    objectives = [ObjectiveConfig("mlm", args={"modality": "text"}),
                  ObjectiveConfig("mae", args={"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2})]
    return build_model(ModelConfig(encoder=_cfg(experts=True)), objectives, {"text": text, "image": image}).eval()


def test_the_model_routes_by_the_packed_batchs_modality_ids():
    model = _model()
    assert model.encoder.experts == 2 and model.modality_ids == {"text": 0, "image": 1}
    # one image-text pair in one sequence: 3 caption tokens, then [CLS] + 4 patches
    seq = PackedSeqInfo.from_seqlens([8])
    batch = PackedBatch(seq, {"text": TokenInput(torch.tensor([1, 5, 2]), torch.arange(3), torch.arange(3)),
                              "image": ImageInput(torch.randn(1, 3, 8, 8), index=torch.arange(3, 8))})
    routed = model.token_modalities(batch)
    ids = routed.ids
    assert torch.equal(ids, torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])) and routed.counts == (3, 5)  # counts from the host
    with torch.no_grad():
        assert torch.allclose(model.encode(batch), model.encoder(model.embed(batch), seq, modality=ids), atol=1e-6)
        assert [r.tolist() for r in model.encoder.route(routed)] == [r.tolist() for r in model.encoder.route(ids)]
        text_only = PackedBatch(PackedSeqInfo.from_seqlens([3]), {"text": TokenInput(torch.tensor([1, 5, 2]),
                                                                                      torch.arange(3))})
        assert model.token_modalities(text_only) == 0


def test_a_token_no_expert_claims_is_refused_not_passed_without_its_mlp():
    """Ids outside [0, experts), a route shorter than the stream, or inputs that leave a stream row unfilled ran
    without an error: those tokens got a zero MLP output (or a zero embedding)."""
    from mmm.core.encoder import TokenModality

    enc = TransformerEncoder(_cfg(), experts=2)
    seq, x = PackedSeqInfo.from_seqlens([3, 2]), torch.randn(5, D)
    for bad, message in ((torch.tensor([0, 1, 2, 1, 0]), r"must lie in \[0, 2\).*from 0 to 2"),
                         (torch.tensor([0, 1, -1, 1, 0]), r"must lie in \[0, 2\).*from -1 to 1"),
                         (torch.tensor([0, 1, 1]), r"one index per token, \(5,\); got shape \(3,\)"),
                         (TokenModality(torch.tensor([0, 1, 1, 1, 0]), (2, 2)), r"counts \[2, 2\] \(sum 4\)")):
        with pytest.raises(ValueError, match=message):
            enc(x, seq, modality=bad)
    model = _model()
    gap = PackedBatch(PackedSeqInfo.from_seqlens([8]), {
        "text": TokenInput(torch.tensor([1, 5, 2]), torch.arange(3), torch.arange(3)),
        "image": ImageInput(torch.randn(1, 3, 8, 8), index=torch.arange(4, 8))})  # 4 of the image's 5 rows
    with pytest.raises(ValueError, match=r"place 7 tokens \(text: 3, image: 4\) but the batch's layout holds 8"):
        model.embed(gap)


def test_the_encoder_names_an_input_that_does_not_fit_its_layout():
    """A wrong row count or width died deep in packing.py (index_copy_ / view) or inside nn.Linear."""
    enc = TransformerEncoder(_cfg())
    seq = PackedSeqInfo.from_seqlens([3, 2])
    for bad in (torch.randn(7, D), torch.randn(0, D), torch.randn(5, D + 1), torch.randn(5)):
        with pytest.raises(ValueError, match=rf"takes \(tokens, dim\) = \(5, {D}\) for a layout of 5 tokens in 2 "
                                             rf"sequences; got x of shape {re.escape(str(tuple(bad.shape)))}"):
            enc(bad, seq)
        with pytest.raises(ValueError, match=r"takes \(tokens, dim\)"):
            enc.block_outputs(bad, seq)


def test_folding_an_expert_gives_a_plain_encoder_equal_to_that_modalitys_path():
    model = _model()
    state = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    state.update({f"embedder.{k}": v for k, v in model.embedders["image"].state_dict().items()})
    folded = fold_modality_experts(state, expert=1)
    assert not any(".experts." in k for k in folded)
    assert torch.equal(folded["encoder.blocks.0.mlp.fc1.weight"], model.encoder.blocks[0].mlp.experts[1].fc1.weight)
    plain = ImageEncoder.build(_cfg(experts=True), image_size=8, patch_size=4, position="sincos").eval()
    assert plain.encoder.experts == 0  # a standalone encoder has the ordinary MLP
    plain.load_state_dict(folded, strict=True)
    pixels = torch.randn(2, 3, 8, 8)
    batch = PackedBatch(PackedSeqInfo.from_seqlens([5, 5]), {"image": ImageInput(pixels)})
    vector = model.modality_embed.weight[1].detach()
    with torch.no_grad():  # the model adds its image modality vector after the embedder: fold it, as loading does
        plain.embedder.patch_embed.proj.bias += vector
        plain.embedder.cls_token += vector
        assert torch.allclose(plain(pixels).reshape(10, D), model.encode(batch), atol=1e-5)
    weight = torch.ones(1)
    unchanged = fold_modality_experts({"encoder.blocks.0.mlp.fc1.weight": weight}, 0)  # no experts: as it was
    assert list(unchanged) == ["encoder.blocks.0.mlp.fc1.weight"] and unchanged["encoder.blocks.0.mlp.fc1.weight"] is weight


def test_experts_route_each_token_after_the_longest_first_reordering():
    """On sdpa a batch in data order is reordered for its length groups; each token still passes its own expert."""
    torch.manual_seed(0)
    enc = TransformerEncoder(_cfg(attention="sdpa"), experts=2).eval()
    seq = PackedSeqInfo.from_seqlens([40, 90, 20, 70, 10, 60, 30, 80])
    assert seq.longest_first is not None
    x = torch.randn(seq.num_tokens, D)
    route = torch.randint(0, 2, (seq.num_tokens,))
    torch.testing.assert_close(enc(x, seq, modality=route), _reference(enc, x, seq, route), atol=1e-5, rtol=1e-5)

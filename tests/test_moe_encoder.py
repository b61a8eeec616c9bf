"""The Transformer+MoE encoder classifier and its seed-compatible wrappers (dsmoe.compat)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from dsmoe.models import MoEEncoderConfig, MoEEncoderForSequenceClassification


def tiny(**kw) -> MoEEncoderConfig:
    base = dict(input_dim=12, vocab_size=40, num_classes=3, embedding_dim=16, num_layers=2, num_heads=2,
                max_seq_length=16, dropout=0.0)
    return MoEEncoderConfig(**{**base, **kw})


def model(**kw) -> MoEEncoderForSequenceClassification:
    torch.manual_seed(0)
    return MoEEncoderForSequenceClassification(tiny(**kw)).eval()


@pytest.mark.parametrize("pe", ["sinusoidal", "learned", "none"])
def test_positional_encodings(pe):
    m = model(positional_encoding=pe)
    ids = torch.randint(0, 40, (2, 7))
    perm = torch.randperm(7)
    with torch.no_grad():
        a, b = m(input_ids=ids).logits, m(input_ids=ids[:, perm]).logits
    assert a.shape == (2, 3)
    # without positions, mean pooling over a bidirectional encoder is invariant to the token order
    assert torch.allclose(a, b, atol=1e-5) == (pe == "none")
    learned = [n for n, _ in m.named_parameters() if n.startswith("positional")]
    assert bool(learned) == (pe == "learned")


def test_cls_pooling_and_padding_mask():
    for pooling in ("mean", "cls"):
        m = model(pooling=pooling, use_moe=True, num_experts=4, top_k=2)
        ids = torch.randint(1, 40, (1, 5))
        padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
        mask = torch.tensor([[1] * 5 + [0] * 3])
        with torch.no_grad():
            short, long = m(input_ids=ids), m(input_ids=padded, attention_mask=mask)
        assert torch.allclose(short.logits, long.logits, atol=1e-5), pooling          # padding changes nothing
        assert [u.tolist() for u in short.expert_usage] == [u.tolist() for u in long.expert_usage]
    with pytest.raises(ValueError, match="max_seq_length"):
        m(input_ids=torch.zeros(1, 16, dtype=torch.long))      # 16 tokens + CLS > 16


def test_selective_moe_layers_report_usage_of_real_tokens_only():
    m = model(num_layers=3, use_moe=True, moe_layer_indices=[1], num_experts=4, top_k=2)
    assert [layer.is_moe for layer in m.layers] == [False, True, False]
    assert m.moe_layer_names() == ["layers.1.ffn.moe"]
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    out = m(input_ids=torch.randint(0, 40, (2, 6)), attention_mask=mask, labels=torch.tensor([0, 2]))
    assert len(out.expert_usage) == 1 and out.expert_usage[0].shape == (4,)
    assert int(out.expert_usage[0].sum()) == 10 * 2                  # 10 real tokens x top_k
    assert float(out.loss) == pytest.approx(float(out.task_loss) + float(out.auxiliary_loss))
    assert float(out.auxiliary_loss) > 0
    dense = model(num_layers=3)
    assert dense(input_ids=torch.randint(0, 40, (2, 6))).expert_usage == []


def test_random_routing_has_no_gate_loss_and_learned_routing_trains_the_router():
    x, y = torch.randn(4, 6, 12), torch.tensor([0, 1, 2, 0])
    for gating in (True, False):
        m = model(use_moe=True, num_experts=4, top_k=2, use_gating_network=gating).train()
        out = m(input_features=x, labels=y)
        out.loss.backward()
        grad = m.layers[0].ffn.moe.router.weight.grad
        if gating:
            assert float(out.auxiliary_loss) > 0 and grad is not None and grad.abs().sum() > 0
        else:
            assert float(out.auxiliary_loss) == 0 and (grad is None or grad.abs().sum() == 0)
            torch.manual_seed(1)
            u1 = m(input_features=x).expert_usage[0]
            torch.manual_seed(2)
            u2 = m(input_features=x).expert_usage[0]
            assert not torch.equal(u1, u2)                            # random choices, not the router's


def test_feature_and_token_inputs_and_wrong_inputs():
    m = model()
    assert m(input_features=torch.randn(2, 5, 12)).logits.shape == (2, 3)
    assert m(input_ids=torch.randint(0, 40, (2, 5))).logits.shape == (2, 3)
    with pytest.raises(ValueError, match="exactly one"):
        m(input_ids=torch.zeros(1, 2, dtype=torch.long), input_features=torch.randn(1, 2, 12))
    with pytest.raises(ValueError, match="input_dim=12"):
        m(input_features=torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="input_dim=None"):
        model(input_dim=None)(input_features=torch.randn(1, 2, 12))


def test_save_and_load_with_auto_classes(tmp_path):
    m = model(use_moe=True, num_experts=4, top_k=1, positional_encoding="learned", pooling="cls")
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    assert AutoConfig.from_pretrained(tmp_path).model_type == "dsmoe_moe_encoder"
    m2 = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 40, (2, 5))
    assert torch.equal(m(input_ids=ids).logits, m2(input_ids=ids).logits)


@pytest.mark.parametrize("kw, field", [(dict(use_moe=True, num_experts=2, top_k=3), "top_k"),
                                       (dict(moe_layer_indices=[2]), "moe_layer_indices"),
                                       (dict(positional_encoding="rotary"), "positional_encoding"),
                                       (dict(num_heads=3), "num_heads"), (dict(pooling="max"), "pooling"),
                                       (dict(temperature=0.0), "temperature"),
                                       (dict(input_dim=None, vocab_size=None), "input_dim")])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError) as err:
        tiny(**kw)
    msg = str(err.value)
    assert msg.startswith(f"MoEEncoderConfig.{field}=") and "\n" not in msg


# ---------------------------------------------------------------------------------------------- the original usage
# Every snippet of the original model documentation, with only its import lines changed.

def test_original_snippet_pure_transformer():
    from dsmoe.compat import load_config, TransformerMoE

    config = load_config(overrides={
        "data": {"input_dim": 768, "num_classes": 10},
        "transformer": {
            "embedding_dim": 256,
            "num_layers": 6,
            "num_heads": 8,
            "dropout": 0.1,
            "use_moe": False,
        }
    })

    model = TransformerMoE(config)
    input_tensor = torch.randn(2, 9, 768)
    output = model(input_tensor)  # shape: (batch, seq_len, input_dim)
    logits = output["logits"]  # shape: (batch, num_classes)
    assert logits.shape == (2, 10) and float(output["auxiliary_loss"]) == 0.0
    assert set(config) == {"data", "transformer", "moe", "training"}
    assert config["transformer"]["positional_encoding"] == "sinusoidal" and config["moe"]["num_experts"] == 4


def test_original_snippet_full_moe():
    from dsmoe.compat import load_config, TransformerMoE

    input_tensor = torch.randn(2, 5, 768)
    config = load_config(overrides={
        "transformer": {
            "embedding_dim": 512,
            "num_layers": 8,
            "num_heads": 8,
            "use_moe": True,  # Enable MoE in all layers
        },
        "moe": {
            "num_experts": 8,
            "top_k": 2,
            "temperature": 0.5,
            "load_balance_weight": 0.01,
        }
    })

    model = TransformerMoE(config)
    output = model(input_tensor)
    logits = output["logits"]
    auxiliary_loss = output["auxiliary_loss"]  # For load balancing

    # Total training loss
    cross_entropy_loss = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 3]))
    total_loss = cross_entropy_loss + auxiliary_loss
    assert logits.shape == (2, 10) and float(auxiliary_loss) > 0 and total_loss.requires_grad
    assert len(output["expert_usage"]) == 8 and model.layers[0].ffn.moe.cfg.router_temperature == 0.5


def test_original_snippet_selective_moe():
    from dsmoe.compat import load_config, TransformerMoE

    config = load_config(overrides={
        "transformer": {
            "num_layers": 12,
            "use_moe": True,
            "moe_layer_indices": [4, 8, 11],  # Only layers 4, 8, 11 use MoE
        },
        "moe": {
            "num_experts": 4,
            "top_k": 2,
        }
    })

    model = TransformerMoE(config)
    assert [i for i, layer in enumerate(model.layers) if layer.is_moe] == [4, 8, 11]
    assert len(model(torch.randn(1, 3, 768))["expert_usage"]) == 3


def test_original_snippet_federated_client_loop_trains():
    from dsmoe.compat import load_config, TransformerMoE

    config = load_config(overrides={"data": {"input_dim": 8, "num_classes": 2},
                                    "transformer": {"embedding_dim": 32, "num_layers": 2, "num_heads": 4,
                                                    "use_moe": True, "dropout": 0.0},
                                    "training": {"learning_rate": 3e-3}})
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(64, 6, 8, generator=g)
    ys = (xs[:, :, 0].mean(1) > 0).long()          # a learnable rule
    local_dataloader = [{"input": xs[i:i + 16], "labels": ys[i:i + 16]} for i in range(0, 64, 16)] * 10
    criterion = torch.nn.CrossEntropyLoss()
    torch.manual_seed(0)
    losses = []

    # On each client
    model = TransformerMoE(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["training"]["learning_rate"])

    for batch in local_dataloader:
        optimizer.zero_grad()

        output = model(batch["input"])

        # Main task loss
        task_loss = criterion(output["logits"], batch["labels"])

        # Add auxiliary load-balancing loss
        total_loss = task_loss + output["auxiliary_loss"]

        total_loss.backward()
        optimizer.step()
        losses.append(float(task_loss))

    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4


def test_compat_refuses_unknown_options():
    from dsmoe.compat import load_config

    with pytest.raises(ValueError, match="moe.expert_dropout"):
        load_config(overrides={"moe": {"expert_dropout": 0.1}})
    with pytest.raises(ValueError, match="unknown section 'optimizer'"):
        load_config(overrides={"optimizer": {}})

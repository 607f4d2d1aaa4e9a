"""The ensemble: shapes, padding, gradients, every fusion mode / expert kind / backbone."""

import io
import itertools

import pytest
import torch

from model.config import TaskSpec, UnirankConfig
from model.ensemble import build_model, param_groups, set_precision
from model.features import FeatureProcessor
from model.losses import MultiTaskLoss

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def batch(tiny_cfg, examples):
    proc = FeatureProcessor(tiny_cfg().dataset).fit([examples])
    return proc(examples.slice(0, 64))


def test_output_shapes_per_task(tiny_cfg, batch):
    cfg = tiny_cfg()
    out = build_model(cfg).eval()(*batch.inputs())
    assert set(out) == {t.name for t in cfg.dataset.tasks}
    for v in out.values():
        assert v.shape == (64,) and v.dtype == torch.float32 and torch.isfinite(v).all()


def test_default_config_builds_and_runs(examples):
    cfg = UnirankConfig()
    proc = FeatureProcessor(cfg.dataset)
    out = build_model(cfg).eval()(*proc(examples.slice(0, 8)).inputs())
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "click": (8,),
        "add_to_cart": (8,),
        "checkout": (8,),
        "engage": (8,),
    }


def test_adding_a_task_is_config_only(tiny_cfg, examples):
    cfg = tiny_cfg()
    cfg.dataset.tasks = [
        *cfg.dataset.tasks,
        TaskSpec(name="dwell", label_column="price", loss="mse"),
    ]
    b = FeatureProcessor(cfg.dataset).fit([examples])(examples.slice(0, 16))
    out = build_model(cfg)(*b.inputs())
    assert out["dwell"].shape == (16,) and b.labels.shape == (16, 5)
    loss, per_task = MultiTaskLoss.from_config(cfg)(out, b)
    assert set(per_task) == {"click", "add_to_cart", "checkout", "engage", "dwell"}


def test_shared_tables_are_one_set_of_rows(tiny_cfg):
    model = build_model(tiny_cfg())
    emb = model.embeddings
    names = ["user_id", "item_id", "source_item_id", "advertiser_id", "campaign_id", "category_id"]
    offsets = dict(zip(names, emb.sparse_offsets.tolist()[: len(names)], strict=True))
    assert offsets["source_item_id"] == offsets["item_id"] == emb.seq_offset
    assert emb.table.num_embeddings == 512 + 1024 + 64 + 128 + 32 + 256 + 8 + 24 + 8


def _user_vector(model, b):
    cand = model.embeddings.sparse(b.sparse)[:, model.candidate_index]
    items = model.embeddings.sequence(b.seq_items)
    return model.sequence(items, b.seq_types, b.seq_gaps, b.seq_mask, cand)


def test_padding_does_not_change_the_output(tiny_cfg, batch):
    model = build_model(tiny_cfg()).eval()
    assert (~batch.seq_mask).any(), "fixture needs some padded sequences"
    noisy = batch._map(lambda t: t.clone())
    pad = ~noisy.seq_mask
    g = torch.Generator().manual_seed(1)
    noisy.seq_items[pad] = torch.randint(1, 1000, (int(pad.sum()),), generator=g)
    noisy.seq_types[pad] = torch.randint(0, 8, (int(pad.sum()),), generator=g)
    noisy.seq_gaps[pad] = torch.rand(int(pad.sum()), generator=g) * 1e6
    with torch.no_grad():
        torch.testing.assert_close(_user_vector(model, batch), _user_vector(model, noisy))
        a, b = model(*batch.inputs()), model(*noisy.inputs())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_all_padding_sequence_is_finite(tiny_cfg, batch):
    model = build_model(tiny_cfg())
    empty = batch._map(lambda t: t.clone())
    empty.seq_mask[:] = False
    u = _user_vector(model, empty)
    assert torch.isfinite(u).all() and (u == 0).all()
    out = model(*empty.inputs())
    loss = sum(v.sum() for v in out.values())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


COMBOS = [
    # (backbones, fusion, experts, low_rank)
    (["cross", "attention", "masknet"], "gating", "none", None),
    (["cross", "attention"], "average", "mmoe", 4),
    (["cross", "masknet"], "blend", "ple", None),
    (["attention"], "gating", "ple", None),
    (["masknet", "cross"], "average", "none", 2),
    (["cross", "attention", "masknet"], "blend", "mmoe", None),
]


@pytest.mark.parametrize(("backbones", "fusion", "experts", "low_rank"), COMBOS)
def test_every_branch_receives_gradient(tiny_cfg, batch, backbones, fusion, experts, low_rank):
    cfg = tiny_cfg(
        backbones=backbones,
        fusion=fusion,
        experts={"kind": experts, "num_experts": 2, "num_shared": 1, "hidden": 16},
        cross={"num_layers": 2, "low_rank": low_rank},
    )
    model = build_model(cfg)
    assert model.backbone_names == backbones
    out = model(*batch.inputs())
    # Full labels so every tower gets a loss term; perturbed so gradients are generic.
    b = batch._map(lambda t: t.clone())
    b.label_mask[:] = True
    loss, _ = MultiTaskLoss.from_config(cfg)(out, b)
    loss.backward()
    # Every parameter is in the graph (DDP needs no find_unused_parameters)...
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # ...and learns, except a softmax gate over a single backbone, which is constant.
    silent = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    expected = []
    if len(backbones) == 1:
        expected = [n for n, _ in model.fusion.named_parameters(prefix="fusion")]
    assert silent == expected, silent


def test_sequence_options_off(tiny_cfg, batch):
    cfg = tiny_cfg(sequence={"candidate_attention": False, "recency_bias": False, "num_layers": 2})
    model = build_model(cfg)
    assert model.sequence.recency is None
    out = model(*batch.inputs())
    assert all(torch.isfinite(v).all() for v in out.values())
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    torch.jit.script(model)  # the optional pieces still compile
    no_seq = build_model(tiny_cfg(sequence={"enabled": False}))
    assert no_seq.sequence is None
    assert no_seq(*batch.inputs())["click"].shape == (64,)


def test_param_groups(tiny_cfg):
    model = build_model(tiny_cfg())
    groups = param_groups(model, weight_decay=0.01, embedding_lr=0.05)
    by_name = {g["name"]: g for g in groups}
    ids = {n: {id(p) for p in g["params"]} for n, g in by_name.items()}
    assert id(model.embeddings.table.weight) in ids["embeddings"]
    assert by_name["embeddings"]["lr"] == 0.05 and by_name["embeddings"]["weight_decay"] == 0
    assert id(model.sequence.norm.weight) in ids["no_decay"]
    assert id(model.bottom[0].bias) in ids["no_decay"]
    assert id(model.bottom[0].weight) in ids["decay"]
    assert by_name["decay"]["weight_decay"] == 0.01
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(model.parameters()))
    assert not set.intersection(*ids.values())
    torch.optim.AdamW(groups, lr=1e-3)  # accepted by a real optimizer
    assert "lr" not in {g["name"]: g for g in param_groups(model, 0.0)}["embeddings"]
    emb = {g["name"]: g for g in param_groups(model, 0.0, embedding_weight_decay=0.3)}
    assert emb["embeddings"]["weight_decay"] == 0.3 and emb["decay"]["weight_decay"] == 0.0


def test_set_precision_only_touches_heavy_layers(tiny_cfg, batch):
    model = set_precision(
        build_model(tiny_cfg(backbones=["cross", "attention", "masknet"])), "bf16"
    )
    assert model.backbones[0].layers[0].weight.dtype == torch.bfloat16
    assert model.sequence.stack.blocks[0].qkv.weight.dtype == torch.bfloat16
    assert model.embeddings.table.weight.dtype == torch.float32
    assert model.towers.towers[0][1].weight.dtype == torch.float32
    out = model.eval()(*batch.inputs())
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    with pytest.raises(ValueError, match="precision"):
        set_precision(model, "int4")


def test_fusion_and_expert_kinds_cover_config_literals():
    from model.config import ExpertsConfig, ModelConfig

    fusions = ModelConfig.model_fields["fusion"].annotation.__args__
    kinds = ExpertsConfig.model_fields["kind"].annotation.__args__
    tested = {(c[1], c[2]) for c in COMBOS}
    assert {f for f, _ in tested} == set(fusions)
    assert {k for _, k in tested} == set(kinds)
    assert set(itertools.chain(*[c[0] for c in COMBOS])) == {"cross", "attention", "masknet"}


@pytest.mark.parametrize(("backbones", "fusion", "experts", "low_rank"), [COMBOS[2], COMBOS[4]])
def test_other_variants_script(tiny_cfg, batch, backbones, fusion, experts, low_rank):
    cfg = tiny_cfg(
        backbones=backbones,
        fusion=fusion,
        experts={"kind": experts},
        cross={"low_rank": low_rank},
    )
    model = build_model(cfg).eval()
    eager = model(*batch.inputs())
    scripted = torch.jit.script(model)(*batch.inputs())
    for k in eager:
        torch.testing.assert_close(scripted[k], eager[k], rtol=0, atol=1e-5)


def test_sparse_embeddings_train_with_sparse_adam(tiny_cfg, batch):
    cfg = tiny_cfg()
    model = build_model(cfg, sparse_embeddings=True)
    groups = {g["name"]: g for g in param_groups(model, 1e-5)}
    table = model.embeddings.table.weight
    dense_params = groups["decay"]["params"] + groups["no_decay"]["params"]
    dense_params += [p for p in groups["embeddings"]["params"] if p is not table]
    opt_sparse = torch.optim.SparseAdam([table], lr=1e-2)
    opt_dense = torch.optim.Adam(dense_params, lr=1e-2)
    before = table.detach().clone()
    loss, _ = MultiTaskLoss.from_config(cfg)(model(*batch.inputs()), batch)
    loss.backward()
    assert table.grad.is_sparse
    opt_sparse.step()
    opt_dense.step()
    changed = (table.detach() != before).any(1)
    assert 0 < changed.sum() < table.shape[0] // 4  # only looked-up rows moved


def test_dot_interaction_feeds_every_pairwise_field_dot_product(tiny_cfg, batch):
    cfg = tiny_cfg(dot_interaction=True)
    model = build_model(cfg).eval()
    seen = {}
    hook = model.bottom.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    out = model(*batch.inputs())
    hook.remove()
    sparse, multi, dense, items, types, gaps, mask, task_type = batch.inputs()
    user_h = model.encode_user(items, types, gaps, mask)
    fields = model.fields(sparse, multi, dense, user_h, None, gaps, mask, task_type)  # (B, K, D)
    k, d = fields.shape[1], fields.shape[2]
    x = seen["x"]
    assert x.shape == (64, k * d + k * (k - 1) // 2)
    torch.testing.assert_close(x[:, : k * d], fields.flatten(1))
    dots = x[:, k * d :]
    # pair order is the upper triangle row by row: (0, 1), (0, 2), ..., (K-2, K-1)
    torch.testing.assert_close(dots[:, 0], (fields[:, 0] * fields[:, 1]).sum(-1))
    torch.testing.assert_close(dots[:, -1], (fields[:, -2] * fields[:, -1]).sum(-1))
    # off: no extra inputs; on: it trains and exports like the rest
    plain = build_model(tiny_cfg(dot_interaction=False))
    assert plain.bottom[0].in_features == k * d
    model.train()
    sum(v.sum() for v in model(*batch.inputs()).values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    scripted = torch.jit.script(model.eval())
    torch.testing.assert_close(scripted(*batch.inputs())["click"], out["click"])
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.jit.load(buf)(*batch.inputs())["click"], out["click"])
    # the pair indices derive from the config, so they are not saved: checkpoints written
    # before the option existed have exactly the default model's keys and still load
    assert not [k for k in (*model.state_dict(), *plain.state_dict()) if k.startswith("dot_")]

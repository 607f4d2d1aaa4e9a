"""A short training run on planted-signal data: loss falls, the model beats a logistic
regression on the sparse checkout task, and recent events move the user vector more."""

import numpy as np
import pytest
import torch
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import OneHotEncoder

from model.metrics import auc, evaluate

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def test_batch(trained, make_table):
    _, _, proc, _ = trained
    return proc(make_table(4000, seed=3))


def test_loss_falls(trained):
    losses = trained[3]
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.8 * first, (first, last)
    assert np.isfinite(losses).all()


def test_beats_logistic_regression_on_sparse_checkout(trained, make_table, test_batch):
    cfg, model, proc, _ = trained
    j = [t.name for t in cfg.dataset.tasks].index("checkout")
    train_b, test_b = proc(make_table(8000, seed=2)), test_batch

    def design(b, enc=None):
        cats = np.concatenate([b.sparse.numpy(), b.task_type.numpy()[:, None]], 1)
        enc = enc or OneHotEncoder(handle_unknown="ignore").fit(cats)
        return sparse.hstack([enc.transform(cats), sparse.csr_matrix(b.dense.numpy())]).tocsr(), enc

    x_tr, enc = design(train_b)
    x_te, _ = design(test_b, enc)
    m_tr, m_te = train_b.label_mask[:, j].numpy(), test_b.label_mask[:, j].numpy()
    y_tr, y_te = train_b.labels[m_tr, j].numpy(), test_b.labels[m_te, j].numpy()
    assert 0.02 < y_te.mean() < 0.15  # sparse
    lr = LogisticRegression(C=1.0, max_iter=2000).fit(x_tr[m_tr], y_tr)
    lr_auc = auc(y_te, lr.predict_proba(x_te[m_te])[:, 1])
    with torch.no_grad():
        probs = {k: torch.sigmoid(v).numpy() for k, v in model(*test_b.inputs()).items()}
    model_auc = auc(y_te, probs["checkout"][m_te])
    assert model_auc > lr_auc + 0.05, (model_auc, lr_auc)
    # and the multi-task model is useful on the dense task too
    res = evaluate(
        probs,
        test_b.labels.numpy(),
        test_b.label_mask.numpy(),
        list(probs),
        test_b.task_type.numpy(),
        proc.layout.task_types,
    )
    assert res["click"]["pooled"]["auc"] > 0.65
    assert res["click"]["pooled"]["ne"] < 1.0


def test_recent_events_move_the_user_vector_more(trained, test_batch):
    _, model, _, _ = trained
    b = test_batch
    full = b.seq_mask.all(1)  # rows with a full window of events
    assert full.sum() > 100
    idx = torch.nonzero(full).squeeze(1)[:400]

    def user(seq_items):
        with torch.no_grad():
            cand = model.embeddings.sparse(b.sparse[idx])[:, model.candidate_index]
            items = model.embeddings.sequence(seq_items)
            return model.sequence(items, b.seq_types[idx], b.seq_gaps[idx], b.seq_mask[idx], cand)

    base_items = b.seq_items[idx]
    base = user(base_items)
    g = torch.Generator().manual_seed(0)
    replacement = torch.randint(1, 1024, (len(idx),), generator=g)

    def moved(pos):
        changed = base_items.clone()
        changed[:, pos] = replacement
        return (user(changed) - base).norm(dim=1).mean().item()

    newest, oldest = moved(-1), moved(0)
    assert newest > 1.5 * oldest, (newest, oldest)

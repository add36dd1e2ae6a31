"""Controlled NextItNet runs on ML-1M-partial: one difference at a time from our model's choices (seqquality).

A plain-PyTorch replica of our NextItNet's network (``recsys_transfer.modules.dilated_cnn.DilatedCNN``: our blocks,
truncated normal 0.02 init, masked padding; item table truncated normal 0.02; output tied to the table), trained by
``torch.optim.Adam`` on the batches of ``sequence_throughput.py`` (same data, split, seeded batch order), and
RecBole's NextItNet (``recbole``) on the same batches. Variants (one change from ``base``, full softmax):
``final`` (RecBole's final Linear, xavier, bias 0.1), ``convdef`` (PyTorch's default conv init), ``embuni``
(RecBole's uniform +-sqrt(1/V) table init), ``pademb`` (no mask: padding id 0's zero row through the network, as
RecBole), ``lneps`` (LayerNorm eps 1e-5), ``recbolelike`` (all of these), ``sampled`` (705 uniform negatives, the
shared pool of our sampled softmax, accidental hits at -inf), ``p_sampled`` / ``p_full`` (the pretraining
pipeline's 4 blocks, batch 128, 1024 negatives / full). Printed per epoch: train loss (last 5 steps), ``vce`` (the
validation users' cross entropy over every item at every position), ``amrr5`` (MRR@5 on the whole pool at every
validation position: ~17k targets, far less noisy than ``mrr5``, the 576 held-out last items).

    python benchmarks/nextitnet_softmax_ablation.py EPOCHS base,sampled,recbole
"""
import sys, time, json, math
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
import sequence_throughput as st
from recsys_transfer.modules.dilated_cnn import DilatedCNN, init_truncated_normal
torch.set_num_threads(1)

class Replica(nn.Module):
    def __init__(s, V, C=64, blocks=5, emb="trunc", conv="trunc", final=False, mask=True, ln_eps=1e-8):
        super().__init__()
        s.emb = nn.Embedding(V, C, padding_idx=None if mask else 0)
        if emb == "trunc": init_truncated_normal(s.emb.weight)
        else:
            sd = math.sqrt(1.0 / V); nn.init.uniform_(s.emb.weight, -sd, sd)
        if not mask:
            with torch.no_grad(): s.emb.weight[0].zero_()
        s.cnn = DilatedCNN(C, (1, 4) * blocks, 3, True)
        for b in s.cnn.blocks:
            b.ln1.eps = b.ln2.eps = ln_eps
            if conv == "default":
                for c in (b.conv1, b.conv2): c.reset_parameters()
        s.final = None
        if final:
            s.final = nn.Linear(C, C); nn.init.xavier_normal_(s.final.weight); nn.init.constant_(s.final.bias, 0.1)
        s.mask = mask
    def hidden(s, x):  # x [B, n] left padded ids
        e = s.emb(x)
        m = (x != 0).unsqueeze(2).to(e.dtype) if s.mask else None
        h = s.cnn(e, m)
        return s.final(h) if s.final is not None else h

class RB(nn.Module):
    def __init__(s, V):
        super().__init__()
        class A: seq_len=50; dim=64; blocks=5; dilations=(1,4); reg_weight=1e-5; seed=0; lr=1e-3
        s.r = st.RecBole(V, A); s.m = s.r.model; s.emb = s.m.item_embedding; s.final = None
    def hidden(s, x):
        return s.m.final_layer(s.m.residual_blocks(s.m.item_embedding(x)))

def run(name, data, epochs, seed=0, sampled=0, lr=1e-3, bs=256, **kw):
    torch.manual_seed(seed)
    V = data.vocab
    m = RB(V) if kw.pop("recbole", False) else Replica(V, **kw); opt = torch.optim.Adam(m.parameters(), lr=lr)
    hist = []
    for ep in range(epochs):
        m.train(); t0 = time.time(); tl = []
        for b in data.batches(ep, bs):
            x, y = b.x, b.y
            h = m.hidden(x); msk = y != 0
            q = h[msk]; t = y[msk]
            if sampled:
                rng = np.random.default_rng(list(b.key) + [7])
                neg = torch.from_numpy(rng.integers(2, V, size=sampled))
                pos = (q * m.emb(t)).sum(1, keepdim=True)
                ns = q @ m.emb(neg).t(); ns = ns.masked_fill(neg[None] == t[:, None], float("-inf"))
                loss = F.cross_entropy(torch.cat([pos, ns], 1), torch.zeros(len(t), dtype=torch.long))
            else:
                logits = q @ m.emb.weight.t(); logits[:, :2] = float("-inf")
                loss = F.cross_entropy(logits, t)
            opt.zero_grad(); loss.backward(); opt.step(); tl.append(loss.item())
        m.eval()
        with torch.no_grad():
            def score(x):
                return m.hidden(x)[:, -1] @ m.emb.weight.t()
            met = st.validation_metrics(score, data)
            # all-position validation CE (full softmax), a low-noise quality signal
            vx = data.valid_x; full = torch.cat([vx, torch.from_numpy(data.valid_y)[:, None]], 1)
            xi, yi = full[:, :-1], full[:, 1:].clone(); yi[xi == 0] = 0
            h = m.hidden(xi); k = yi != 0
            lg = h[k] @ m.emb.weight.t(); lg[:, :2] = float("-inf")
            vce = F.cross_entropy(lg, yi[k]).item()
            pos = lg.gather(1, yi[k][:, None]); rank = (lg > pos).sum(1) + 1
            amrr5 = torch.where(rank <= 5, 1.0 / rank, torch.zeros_like(pos[:, 0], dtype=torch.float)).mean().item()
        rec = dict(ep=ep + 1, train=float(np.mean(tl[-5:])), vce=vce, amrr5=amrr5, mrr5=met["mrr@5"], ndcg10=met["ndcg@10"], s=time.time() - t0)
        hist.append(rec)
        print(name, json.dumps(rec), flush=True)
    return hist

if __name__ == "__main__":
    seqs, vocab, info = st.ml1m_sequences(st.ML1M_RAW, 50)
    data = st.Sequences(seqs, vocab, 50, 0.1, 0)
    epochs = int(sys.argv[1]); names = sys.argv[2].split(",")
    V = {"base": {}, "final": dict(final=True), "convdef": dict(conv="default"), "embuni": dict(emb="uniform"),
         "pademb": dict(mask=False), "recbolelike": dict(final=True, conv="default", emb="uniform", mask=False),
         "sampled": dict(sampled=705), "final_sampled": dict(final=True, sampled=705),
         "lneps": dict(ln_eps=1e-5), "recbole": dict(recbole=True), "p_sampled": dict(sampled=1024, bs=128, blocks=4), "p_full": dict(bs=128, blocks=4), "final_convdef": dict(final=True, conv="default")}
    out = {}
    for n in names:
        out[n] = run(n, data, epochs, **V[n])
    json.dump(out, sys.stdout)

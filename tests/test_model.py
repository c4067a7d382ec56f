"""The model: exact causal hyper vocabulary, train/generate consistency, no leaks, plain case."""
import random

import pytest
import torch
import torch.nn.functional as F

import zip2zip as z

V, C, M, EOT = 24, 12, 4, 23


def tiny(**kw):
    args = dict(block_size=48, vocab_size=V, n_layer=2, n_head=2, n_embd=32, max_subtokens=M,
                max_codebook_size=C, disabled_ids=(EOT,), dropout=0.0, hyper_n_embd=16, hyper_n_head=2)
    args.update(kw)
    torch.manual_seed(0)
    model = z.GPT(z.GPTConfig(**args))
    with torch.no_grad():   # a trained-looking model: make the hyper-encoder non-trivial
        for enc in {getattr(model, "hyper_in", None), getattr(model, "hyper_out", None)} - {None}:
            enc.proj.weight.normal_(std=0.2)
    return model.eval()


def stream(seed, n=200):
    """Base ids with repeats (long hypertokens, KwKwK runs) and walls."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        r = rng.random()
        out += [rng.randrange(3)] * rng.randint(2, 6) if r < 0.3 else \
            [EOT] if r < 0.35 else [1, 2, 3, 4] if r < 0.6 else [rng.randrange(V - 1)]
    return out[:n]


def codes_of(seed, model, n=49):
    c = model.config
    return z.lzw_encode(stream(seed), V, c.max_codebook_size, c.max_subtokens, c.disabled_ids)[:n]


def test_hyper_batch_matches_the_decoder():
    rows = [codes_of(s, tiny(), 30) for s in range(3)]
    hb = z.hyper_batch(rows, V, C, M, (EOT,))
    for b, row in enumerate(rows):
        lzw = z.LZW(V, C, M, (EOT,))
        for t, code in enumerate(row):
            lzw.push(code)
            assert hb.n_installed[b, t] == len(lzw.entries)
            p = lzw.pending()
            if p is None:
                assert hb.pending[b, t] == -1
            else:
                i = hb.pending[b, t]
                assert tuple(hb.contents[i, :hb.lengths[i]].tolist()) == p
        for j, e in enumerate(lzw.entries):
            i = hb.entries[b, j]
            assert tuple(hb.contents[i, :hb.lengths[i]].tolist()) == e


def test_the_corner_cases_are_in_the_data():
    # the consistency tests below only mean something if their data has every case
    model = tiny()
    kinds = set()
    for s in range(4):
        lzw = z.LZW(V, C, M, (EOT,))
        for code in codes_of(s, model):
            n = len(lzw.entries)
            kinds |= {"kwkwk"} if code == V + n else {"hyper"} if code >= V else {"wall"} if code == EOT else set()
            lzw.push(code)
            kinds |= {"full"} if len(lzw.entries) == C else set()
    assert kinds == {"kwkwk", "hyper", "wall", "full"}


@pytest.mark.parametrize("tie", [True, False])
def test_teacher_forcing_equals_kv_cached_steps(tie):
    model = tiny(tie_weights=tie)
    rows = [codes_of(s, model) for s in range(4)]
    idx, tgt = torch.tensor([r[:-1] for r in rows]), torch.tensor([r[1:] for r in rows])
    with torch.no_grad():
        logits, loss = model(idx, tgt)
        logp_tf = F.log_softmax(logits, -1)
        dec = z.IncrementalDecoder(model, [r[:1] for r in rows])
        for t in range(idx.size(1)):
            step = F.log_softmax(dec.logits(), -1)                        # (B, V + n + 1)
            w = step.size(-1)
            # same finite set, same values; columns past the step's width are -inf in both
            assert torch.equal(torch.isinf(logp_tf[:, t, :w]), torch.isinf(step))
            assert torch.isinf(logp_tf[:, t, w:]).all()
            fin = torch.isfinite(step)
            torch.testing.assert_close(logp_tf[:, t, :w][fin], step[fin], atol=1e-4, rtol=0)
            dec.advance(tgt[:, t].tolist())
    # every target was scored: the loss is the mean NLL over all of them, none dropped
    nll = -logp_tf.gather(-1, tgt[..., None]).mean()
    torch.testing.assert_close(model.last_losses["lm"], nll)
    assert torch.isfinite(loss)


def test_valid_set_is_exactly_the_decoders():
    model = tiny()
    row = codes_of(1, model, 48)
    with torch.no_grad():
        logits, _ = model(torch.tensor([row]))
    lzw = z.LZW(V, C, M, (EOT,))
    for t, code in enumerate(row):
        lzw.push(code)
        valid = set(range(V + len(lzw.entries))) | ({V + len(lzw.entries)} if lzw.pending() else set())
        assert set(torch.isfinite(logits[0, t]).nonzero()[:, 0].tolist()) == valid


def test_no_leak_from_the_future():
    model = tiny()
    a = codes_of(2, model, 48)
    for t in (5, 20, 40):
        b = a[:t + 1] + codes_of(3, model)[:len(a) - t - 1]    # any continuation
        b = b[:t + 1] + [x if x < V else 0 for x in b[t + 1:]]  # keep it valid: base ids only
        with torch.no_grad():
            la, _ = model(torch.tensor([a]))
            lb, _ = model(torch.tensor([b]))
        w = min(la.size(-1), lb.size(-1))
        assert torch.equal(la[0, :t + 1, :w], lb[0, :t + 1, :w])
        assert torch.isinf(la[0, :t + 1, w:]).all() and torch.isinf(lb[0, :t + 1, w:]).all()


def test_invalid_target_is_a_clear_error():
    model = tiny()
    idx = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="target 30 at row 0, position 1"):
        model(idx, torch.tensor([[2, 30, 1]]))


def test_greedy_generation_is_argmax_of_teacher_forcing():
    model = tiny()
    prompts = [codes_of(s, model, 10) for s in range(3)]
    out = model.generate(torch.tensor(prompts), 30, top_k=1)
    assert out.shape == (3, 40) and torch.equal(out[:, :10], torch.tensor(prompts))
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    assert torch.equal(logits[:, 9:].argmax(-1), out[:, 10:])
    for row in out.tolist():
        z.lzw_decode(row, V, C, M, (EOT,))                              # decodes, no ValueError


def test_ragged_batch_equals_one_row_at_a_time():
    model = tiny()
    prompts = [codes_of(s, model, n) for s, n in ((0, 3), (1, 17), (2, 9))]
    batch = model.generate(prompts, 20, top_k=1)
    for p, row in zip(prompts, batch):
        assert row == model.generate([p], 20, top_k=1)[0]


def test_generation_past_the_context_and_long_scoring():
    model = tiny(block_size=16)
    out = model.generate(torch.tensor([[1, 2, 3]]), 60, temperature=0.8, top_k=5)
    assert out.shape == (1, 63)
    z.lzw_decode(out[0].tolist(), V, C, M, (EOT,))
    # scoring longer than the context goes through the same crop-and-refill path, and equals
    # teacher forcing on what fits
    codes = codes_of(4, model, 17)
    dec, total = z.IncrementalDecoder(model, [codes[:1]]), 0.0
    with torch.no_grad():
        for code in codes[1:]:
            total -= F.log_softmax(dec.logits(), -1)[0, code].item()
            dec.advance([code])
        assert model.nll(codes) == pytest.approx(total, abs=1e-3)
        assert model.nll(codes_of(4, model, 49)) > 0


def test_plain_model_when_max_subtokens_is_one():
    plain = tiny(max_subtokens=1)
    assert not hasattr(plain, "hyper_in") and not hasattr(plain, "recon")
    n_plain = sum(p.numel() for p in plain.parameters())
    cfg = plain.config
    expected = (V + cfg.block_size) * 32 + 2 * (12 * 32 * 32 + 13 * 32) + 2 * 32  # wte+wpe, blocks, ln_f
    assert n_plain == expected
    idx = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        logits, loss = plain(idx, idx)
    assert logits.shape == (2, 20, V) and set(plain.last_losses) == {"lm"}
    out = plain.generate(idx[:, :5], 10, top_k=1)
    assert out.max() < V


def test_reconstruction_loss_is_reported_and_can_be_off():
    model = tiny().train()
    row = codes_of(0, model)
    idx, tgt = torch.tensor([row[:-1]]), torch.tensor([row[1:]])
    _, loss = model(idx, tgt)
    lm, recon = model.last_losses["lm"], model.last_losses["recon"]
    torch.testing.assert_close(loss.detach(), lm + 0.1 * recon)
    off = tiny(recon_lambda=0.0).train()
    _, loss = off(idx, tgt)
    assert set(off.last_losses) == {"lm"}
    loss.backward()
    assert off.recon.grad is None


def test_hyper_encoder_starts_near_the_mean_of_its_base_embeddings():
    torch.manual_seed(0)
    model = z.GPT(z.GPTConfig(block_size=8, vocab_size=V, n_layer=1, n_head=2, n_embd=32, max_codebook_size=C))
    contents, lengths = torch.tensor([[1, 2, 0, 0], [3, 3, 3, 0]]), torch.tensor([2, 3])
    h, _ = model.hyper_tables(contents, lengths)
    wte = model.transformer.wte.weight
    mean = torch.stack([wte[[1, 2]].mean(0), wte[[3, 3, 3]].mean(0)])
    torch.testing.assert_close(h, mean)


def test_tiny_model_overfits_and_speaks_in_hypertokens():
    torch.manual_seed(0)
    text = [5, 6, 7, 8, 9, 10] * 30
    codes = z.lzw_encode([EOT] + text, V, C, M, (EOT,))[:40]
    model = z.GPT(z.GPTConfig(block_size=40, vocab_size=V, n_layer=2, n_head=2, n_embd=48,
                              max_subtokens=M, max_codebook_size=C, disabled_ids=(EOT,),
                              hyper_n_embd=24, hyper_n_head=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx, tgt = torch.tensor([codes[:-1]]), torch.tensor([codes[1:]])
    hb = model.hyper_batch(idx.tolist())
    for _ in range(150):
        _, loss = model(idx, tgt, hyper=hb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.last_losses["lm"] < 0.05
    model.eval()
    out = model.generate(torch.tensor([codes[:12]]), 20, top_k=1)[0].tolist()
    assert out[:32] == codes[:32]                                      # it recites the text
    assert any(c >= V for c in out[12:])                               # in hypertokens
    assert z.lzw_decode(out, V, C, M, (EOT,))[1:] == text[:len(z.lzw_decode(out, V, C, M, (EOT,))) - 1]

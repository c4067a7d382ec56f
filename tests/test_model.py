"""The model: exact causal (and canonical) vocabulary, train/generate consistency, no leaks,
the hyper-encoders against an unpadded reference, the plain case, and what a batch without
hypertokens does."""
import dataclasses
import functools
import random

import pytest
import torch
import torch.nn.functional as F

import fastgen
import zip2zip as z
from brute import code_streams, stream_logp
from evals import likelihood, multiview

V, C, M, EOT = 24, 12, 4, 23
KINDS = ["transformer", "mlp", "mean"]


def tiny(**kw):
    args = dict(block_size=48, vocab_size=V, n_layer=2, n_head=2, n_embd=32, max_subtokens=M,
                max_codebook_size=C, disabled_ids=(EOT,), dropout=0.0, hyper_n_embd=16, hyper_n_head=2)
    args.update(kw)
    torch.manual_seed(0)
    model = z.GPT(z.GPTConfig(**args))
    with torch.no_grad():   # a trained-looking model: make the hyper-encoder non-trivial
        for enc in {getattr(model, "hyper_in", None), getattr(model, "hyper_out", None)} - {None}:
            if hasattr(enc, "proj"):
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


def canonical_next(prefix, code, model):
    """Naive reference of DESIGN.md 2.1: `code` may follow the canonical prefix iff the greedy
    encoder, given the text they decode to, writes exactly prefix + [code]."""
    c = model.config
    args = (c.vocab_size, c.max_codebook_size, c.max_subtokens, c.disabled_ids)
    return z.lzw_encode(z.lzw_decode(prefix + [code], *args), *args) == prefix + [code]


def test_hyper_batch_matches_the_decoder():
    rows = [codes_of(s, tiny(), 30) for s in range(3)]
    hb = z.hyper_batch(rows, V, C, M, (EOT,))
    for b, row in enumerate(rows):
        lzw = z.LZW(V, C, M, (EOT,))
        for t, code in enumerate(row):
            lzw.push(code)
            assert hb.n_installed[b, t] == len(lzw.entries) and hb.match[b, t] == lzw.buf
            p = lzw.pending()
            if p is None:
                assert hb.pending_index[b, t] == -1
            else:
                i = hb.pending_index[b, t]
                assert tuple(hb.contents[i, :hb.lengths[i]].tolist()) == p
        for j, e in enumerate(lzw.entries):
            i = hb.entry_index[b, j]
            assert tuple(hb.contents[i, :hb.lengths[i]].tolist()) == e
            parent, first, last = hb.nodes[b, j].tolist()       # the trie: e = content(parent) + (last,)
            assert ((parent,) if parent < V else lzw.entries[parent - V]) == e[:-1] and (first, last) == (e[0], e[-1])
        assert (hb.nodes[b, len(lzw.entries):, 0] == z.NO_PARENT).all()   # pads are nobody's children


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
            kinds |= {"children"} if lzw.buf in lzw.parents else set()   # something to mask (2.1)
    assert kinds == {"kwkwk", "hyper", "wall", "full", "children"}


@pytest.mark.parametrize("tie,canonical,kind", [(True, True, "transformer"), (False, True, "transformer"),
                                                (True, False, "transformer"), (False, False, "mlp"),
                                                (True, True, "mlp"), (True, True, "mean")])
def test_teacher_forcing_equals_kv_cached_steps(tie, canonical, kind):
    model = tiny(tie_weights=tie, canonical=canonical, hyper_encoder=kind)
    rows = [codes_of(s, model) for s in range(4)]
    idx, tgt = torch.tensor([r[:-1] for r in rows]), torch.tensor([r[1:] for r in rows])
    with torch.no_grad():
        logits, loss, parts = model(idx, tgt, with_parts=True)
        logp_tf = F.log_softmax(logits, -1)
        dec = fastgen.StaticStepper(model, [r[:1] for r in rows])
        for t in range(idx.size(1)):
            step = F.log_softmax(dec.logits, -1)                          # (B, V + C + 1)
            w = min(step.size(-1), logp_tf.size(-1))
            # same finite set, same values; columns past either width are -inf
            assert torch.equal(torch.isinf(logp_tf[:, t, :w]), torch.isinf(step[:, :w]))
            assert torch.isinf(logp_tf[:, t, w:]).all() and torch.isinf(step[:, w:]).all()
            fin = torch.isfinite(step[:, :w])
            torch.testing.assert_close(logp_tf[:, t, :w][fin], step[:, :w][fin], atol=1e-4, rtol=0)
            dec.advance(tgt[:, t].tolist())
    # every target was scored: the loss is the mean NLL over all of them, none dropped
    nll = -logp_tf.gather(-1, tgt[..., None]).mean()
    torch.testing.assert_close(parts["lm"], nll)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("canonical", [True, False])
def test_valid_set_is_exactly_the_decoders(canonical):
    # by hand, [1, 0, 2, 1]: at the end the match (1) has a child, 0 ([1,0] is an entry), and the
    # pending id [1,1] exists: base id 0 (and [0,2]) are masked, the pending id is not
    model, masked = tiny(canonical=canonical), 0
    for row in (codes_of(1, model, 48), [1, 0, 2, 1]):
        with torch.no_grad():
            logits, _ = model(torch.tensor([row]))
        lzw = z.LZW(V, C, M, (EOT,))
        for t, code in enumerate(row):
            lzw.push(code)
            valid = set(range(V + len(lzw.entries))) | ({V + len(lzw.entries)} if lzw.pending() else set())
            if canonical:
                allowed = {x for x in valid if canonical_next(row[:t + 1], x, model)}
                masked += len(valid - allowed)
                valid = allowed
            assert set(torch.isfinite(logits[0, t]).nonzero()[:, 0].tolist()) == valid
    assert masked > 0 or not canonical          # the rule had something to mask here
    assert not canonical or (0 not in valid and V + 1 not in valid and V + 3 in valid)


@pytest.mark.parametrize("canonical,kind", [(True, "transformer"), (False, "transformer"), (True, "mlp"),
                                            (True, "mean")])
def test_no_leak_from_the_future(canonical, kind):
    model = tiny(canonical=canonical, hyper_encoder=kind)
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


def test_invalid_or_non_canonical_target_is_a_clear_error():
    model = tiny()
    idx = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="target 30 at row 0, position 1 is not a valid next code"):
        model(idx, torch.tensor([[2, 30, 1]]))
    # 1 2 | 1 2: after [1, 2, 1] the encoder's match is (1,) and [1,2] (id 24) is installed, so the
    # base id 2 cannot come next: the greedy encoder would have written 24
    with pytest.raises(ValueError, match="target 2 at row 0, position 2 .* not canonical"):
        model(torch.tensor([[1, 2, 1]]), torch.tensor([[2, 1, 2]]))
    _, loss = tiny(canonical=False)(torch.tensor([[1, 2, 1]]), torch.tensor([[2, 1, 2]]))   # fine unmasked
    assert torch.isfinite(loss)


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


def test_ragged_batch_logits_equal_one_row_at_a_time():
    # rows of different lengths, read past the context (block 16): each row is cropped on its
    # own, so its logits are the same as when it is decoded alone
    model = tiny(block_size=16)
    full = [codes_of(s, model, 60) for s in range(3)]
    starts = [3, 14, 9]
    batch = fastgen.StaticStepper(model, [f[:s] for f, s in zip(full, starts)])
    alone = [fastgen.StaticStepper(model, [f[:s]]) for f, s in zip(full, starts)]
    with torch.no_grad():
        for t in range(40):
            for b in range(3):
                torch.testing.assert_close(batch.logits[b], alone[b].logits[0], atol=1e-5, rtol=0)
            batch.advance([f[s + t] for f, s in zip(full, starts)])
            for b, (f, s) in enumerate(zip(full, starts)):
                alone[b].advance([f[s + t]])
    assert sorted(batch.filled) != [batch.filled[0]] * 3         # the rows were cropped at different steps
    greedy = fastgen.generate(model, [f[:s] for f, s in zip(full, starts)], 20, top_k=1)
    assert greedy == [fastgen.generate(model, [f[:s]], 20, top_k=1)[0] for f, s in zip(full, starts)]


def test_no_attention_mask_row_is_empty(monkeypatch):
    # some CUDA kernels return NaN for a query that may attend to nothing, and a NaN in a cache
    # slot can spread: a one-code prompt beside a longer one must not make such a row
    masks, sdpa = [], F.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    model = tiny()
    codes = codes_of(0, model, 5)
    dec = fastgen.StaticStepper(model, [codes[:1], codes], temperature=0)
    dec.advance(dec.next)
    assert len(masks) == 3 * model.config.n_layer                    # the prefill and two steps
    assert all(m.any(-1).all() for m in masks), [m.any(-1) for m in masks]


def test_generation_past_the_context_and_long_scoring():
    model = tiny(block_size=16)
    out = model.generate(torch.tensor([[1, 2, 3]]), 60, temperature=0.8, top_k=5)
    assert out.shape == (1, 63)
    z.lzw_decode(out[0].tolist(), V, C, M, (EOT,))
    # scoring longer than the context goes through the same crop-and-refill path, and equals
    # teacher forcing on what fits
    codes = codes_of(4, model, 17)
    stepper, total = z.Stepper(model), 0.0
    with torch.no_grad():
        for prev, code in zip(codes, codes[1:]):
            total -= F.log_softmax(stepper.read(prev), -1)[code].item()
        assert likelihood.nll(model, codes, prefix=False) == pytest.approx(total, abs=1e-3)
        # the prefix NLL's last term sums the codes that may stand last (DESIGN.md 2.2)
        stepper = z.Stepper(model)
        for code in codes[:-2]:
            stepper.read(code)
        step = F.log_softmax(stepper.read(codes[-2]), -1)
        prefix = total + step[codes[-1]].item() - step[model.last_code_choices(codes)].logsumexp(0).item()
        nll = likelihood.nll(model, codes)
        assert nll == pytest.approx(prefix, abs=1e-3) and nll <= total + 1e-4
        assert likelihood.nll(model, codes_of(4, model, 49)) > 0


def test_plain_model_when_max_subtokens_is_one():
    plain = tiny(max_subtokens=1)
    assert not hasattr(plain, "hyper_in") and not hasattr(plain, "recon")
    n_plain = sum(p.numel() for p in plain.parameters())
    cfg = plain.config
    expected = (V + cfg.block_size) * 32 + 2 * (12 * 32 * 32 + 13 * 32) + 2 * 32  # wte+wpe, blocks, ln_f
    assert n_plain == expected
    idx = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        logits, loss, parts = plain(idx, idx, with_parts=True)
    assert logits.shape == (2, 20, V) and set(parts) == {"lm"}
    out = plain.generate(idx[:, :5], 10, top_k=1)
    assert out.max() < V
    dec = fastgen.StaticStepper(plain, idx[:, :5].tolist())
    assert dec.logits.shape == (2, V) and "table_in" not in dec.state    # no hypertoken rows at all


def test_reconstruction_loss_is_reported_and_can_be_off():
    model = tiny().train()
    row = codes_of(0, model)
    idx, tgt = torch.tensor([row[:-1]]), torch.tensor([row[1:]])
    _, loss, parts = model(idx, tgt, with_parts=True)
    lm, recon = parts["lm"], parts["recon"]
    torch.testing.assert_close(loss.detach(), lm + 0.1 * recon)
    off = tiny(recon_lambda=0.0).train()
    _, loss, parts = off(idx, tgt, with_parts=True)
    assert set(parts) == {"lm"}
    loss.backward()
    assert off.recon.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_hyper_encoder_starts_at_the_mean_of_its_base_embeddings(kind):
    torch.manual_seed(0)
    model = z.GPT(z.GPTConfig(block_size=8, vocab_size=V, n_layer=1, n_head=2, n_embd=32, max_codebook_size=C,
                              hyper_encoder=kind))
    contents, lengths = torch.tensor([[1, 2, 0, 0], [3, 3, 3, 0]]), torch.tensor([2, 3])
    h, _ = model.hyper_tables(contents, lengths)
    wte = model.transformer.wte.weight
    mean = torch.stack([wte[[1, 2]].mean(0), wte[[3, 3, 3]].mean(0)])
    torch.testing.assert_close(h, mean)


def unpadded_reference(enc, content, wte):
    """One entry through the hyper-encoder's own layers, without pads or masks."""
    e = wte[list(content)]                                     # (L, d)
    if enc.kind == "mean":
        return e.mean(0)
    L, M = len(content), enc.slot_pos.size(0)
    x = e + enc.slot_pos[:L]
    if enc.kind == "mlp":                                       # the pads' slots are exactly 0
        return e.mean(0) + enc.proj(enc.mlp(torch.cat([x.flatten(), x.new_zeros((M - L) * x.size(1))])))
    h = enc.c_in(x)[None]                                       # (1, L, dh)
    for block in enc.blocks:
        h = block(h, torch.ones(1, 1, L, L, dtype=torch.bool))
    return e.mean(0) + enc.proj(enc.ln_f(h)[0].mean(0))


@pytest.mark.parametrize("kind", KINDS)
def test_hyper_encoder_equals_an_unpadded_reference(kind):
    # catches pooling over pads, attending to pads, or a pad that leaks into the mean
    model = tiny(hyper_encoder=kind)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)                  # biases and slot positions non-zero
    contents = [(5, 6), (7, 7, 7), (1, 2, 3, 4), (9,)]
    for pad in (0, 13):                                         # whatever the pad ids, the same
        padded = torch.tensor([c + (pad,) * (M - len(c)) for c in contents])
        h, _ = model.hyper_tables(padded, torch.tensor([len(c) for c in contents]))
        for row, content in zip(h, contents):
            torch.testing.assert_close(row, unpadded_reference(model.hyper_in, content, model.transformer.wte.weight),
                                       atol=1e-5, rtol=1e-4)


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
        _, loss, parts = model(idx, tgt, hyper=hb, with_parts=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["lm"] < 0.05
    model.eval()
    out = model.generate(torch.tensor([codes[:12]]), 20, top_k=1)[0].tolist()
    assert out[:32] == codes[:32]                                      # it recites the text
    assert any(c >= V for c in out[12:])                               # in hypertokens
    assert z.lzw_decode(out, V, C, M, (EOT,))[1:] == text[:len(z.lzw_decode(out, V, C, M, (EOT,))) - 1]

# -----------------------------------------------------------------------------
# batches with no hypertoken at all (no entry, no pending id anywhere)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tie", [True, False])
def test_a_batch_without_hypertokens(kind, tie):
    model = tiny(hyper_encoder=kind, tie_weights=tie)
    for idx in ([[EOT]], [[EOT, EOT, EOT]], [[EOT], [EOT]]):
        logits, _ = model(torch.tensor(idx))
        assert logits.shape[-1] == V + 1 and torch.isinf(logits[..., V:]).all()
    _, loss = model(torch.tensor([[EOT, 5]]), torch.tensor([[5, EOT]]))       # 5 then a wall: no pending
    assert torch.isfinite(loss)
    # every parameter gets a gradient (zero where unused), as DDP requires, also with a codebook
    _, loss = model.train()(torch.tensor([[EOT, EOT]]), torch.tensor([[EOT, 5]]))
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    c0 = tiny(max_codebook_size=0, hyper_encoder=kind, tie_weights=tie).train()   # M > 1 but no room at all
    row = codes_of(0, c0)
    _, loss, parts = c0(torch.tensor([row[:-1]]), torch.tensor([row[1:]]), with_parts=True)
    loss.backward()
    assert torch.isfinite(loss) and parts.keys() == {"lm"} and max(row) < V
    assert [n for n, p in c0.named_parameters() if p.grad is None] == []
    assert len(c0.generate([[1, 2, 1, 2]], 5, top_k=1)[0]) == 9


@functools.cache
def gpt2_tiny(kind, tie):
    torch.manual_seed(0)
    return z.GPT(z.GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16, hyper_encoder=kind,
                             tie_weights=tie)).eval()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("text,no_digit_merges", [("a", False), ("\n", False), ("12", False),
                                                  ("2024 1999 2024 1999", True), ("", False)])
def test_score_of_texts_without_hypertokens(text, no_digit_merges, kind, tie):
    tok = z.Tokenizer(4, 1024, no_digit_merges)
    model = gpt2_tiny(kind, tie)
    if no_digit_merges:   # the same weights under the tokenizer's disabled ids
        model = z.GPT(z.GPTConfig(**{**model.config.__dict__, "disabled_ids": tuple(sorted(tok.disabled_ids))}))
        model.load_state_dict(gpt2_tiny(kind, tie).state_dict())
        model.eval()
        assert all(c < tok.vocab_size for c in tok.encode(text))         # digits never merge
    nll, n_bytes = likelihood.score(model, text, tok)
    assert n_bytes == len(text.encode()) and (nll > 0) == (len(text) > 0)
    assert multiview.score(model, text, tok, beam_size=4)[0] == pytest.approx(nll, abs=1e-4)

def test_score_counts_a_literal_endoftext_as_text():
    # scored text is text: its 13 bytes count (as in evals/efficiency.py), only the leading separator
    # that score adds counts 0
    model, tok = gpt2_tiny("transformer", True), z.Tokenizer(4, 1024)
    for text in ("<|endoftext|>", "a<|endoftext|>b", "é<|endoftext|><|endoftext|>"):
        nll, n_bytes = likelihood.score(model, text, tok)
        assert n_bytes == len(text.encode("utf-8")) and nll > 0

# -----------------------------------------------------------------------------
# the canonical-only vocabulary (DESIGN.md 2.1) and the multi-view likelihood (section 5)

SV, SC, SM, SD = 4, 12, 3, 3      # a tiny vocabulary: base ids 0, 1, 2 and one disabled id


def small(canonical):
    torch.manual_seed(1)
    model = z.GPT(z.GPTConfig(block_size=32, vocab_size=SV, n_layer=1, n_head=2, n_embd=16, max_subtokens=SM,
                              max_codebook_size=SC, disabled_ids=(SD,), canonical=canonical, hyper_n_embd=8,
                              hyper_n_head=2))
    return model.eval()     # untrained: probability spread over many codes, so many paths count


@pytest.mark.parametrize("seed", range(3))
def test_canonical_model_gives_one_stream_per_text(seed):
    rng = random.Random(seed)
    ids = [SD] + [rng.choice([0, 1, 0, 1, 2]) for _ in range(11)] + ([SD, 0, 1] if seed == 2 else [])
    streams = code_streams(ids, SV, SC, SM, (SD,))
    canonical = z.lzw_encode(ids, SV, SC, SM, (SD,))
    assert canonical in streams and len(streams) > 3
    assert all(z.lzw_decode(s, SV, SC, SM, (SD,)) == ids for s in streams)
    model, unmasked = small(True), small(False)
    logp = {tuple(s): stream_logp(model, s) for s in streams}
    assert all((lp > float("-inf")) == (list(s) == canonical) for s, lp in logp.items())
    assert likelihood.nll(model, canonical, prefix=False) == pytest.approx(-logp[tuple(canonical)], abs=1e-4)
    for beam in (1, 2, 64):   # the canonical (prefix) NLL is the marginal, whatever the beam
        assert multiview.marginal_nll(model, ids, beam) == pytest.approx(likelihood.nll(model, canonical), abs=1e-4)
    # unmasked: every stream has probability; a beam that holds them all sums them exactly (the
    # brute force of the prefix sum is in test_likelihood.py), and a narrower beam finds less
    exact = multiview.marginal_nll(unmasked, ids, 10 ** 6)
    assert multiview.marginal_nll(unmasked, ids, 1) >= exact - 1e-6
    assert multiview.marginal_nll(unmasked, ids, 1) > exact + 1e-3   # pruning loses mass here
    assert exact < -stream_logp(unmasked, canonical)      # more than the canonical path


def test_marginal_equals_the_nll_of_a_canonical_model_on_real_streams():
    model = tiny()
    ids = [EOT] + stream(5, 40)
    nll = likelihood.nll(model, z.lzw_encode(ids, V, C, M, (EOT,)))
    for beam in (1, 3, 16):
        assert multiview.marginal_nll(model, ids, beam) == pytest.approx(nll, abs=1e-3)
    with pytest.raises(ValueError, match="beam_size"):
        multiview.marginal_nll(model, ids, 0)


@pytest.mark.parametrize("canonical", [True, False])
def test_sampled_streams_of_a_canonical_model_are_canonical(canonical):
    model = tiny(canonical=canonical)
    prompts = [codes_of(s, model, 8) for s in range(4)]
    args = (V, C, M, (EOT,))
    out = model.generate(prompts, 40, temperature=1.0)
    n_canonical = sum(z.lzw_encode(z.lzw_decode(row, *args), *args) == row for row in out)
    if canonical:
        assert n_canonical == len(out)
    else:   # without the mask an (untrained) model wanders off the canonical streams
        assert n_canonical < len(out)


def test_a_dead_end_is_a_clear_error():
    # no disabled id: after 0 0 1 0 the match is (0,) and both [0,0] and [0,1] are entries, so
    # every base id would extend it, every entry starts with one, and no pending id exists
    model = z.GPT(z.GPTConfig(block_size=16, vocab_size=2, n_layer=1, n_head=1, n_embd=8, max_subtokens=3,
                              max_codebook_size=8, disabled_ids=(), hyper_n_embd=4, hyper_n_head=1))
    codes = z.lzw_encode([0, 0, 1, 0], 2, 8, 3)
    with pytest.raises(ValueError, match="row 0 has no valid next code"):
        model.generate([codes], 3)


def test_generate_rejects_bad_settings():
    model = tiny()
    for kw, message in (({"temperature": -0.5}, "temperature must be >= 0"), ({"top_k": 0}, "top_k must be >= 1"),
                        ({"top_k": -3}, "top_k must be >= 1"), ({"max_new_tokens": -1}, "max_new_tokens")):
        with pytest.raises(ValueError, match=message):
            model.generate([[1, 2]], **{"max_new_tokens": 3, **kw})

def test_extreme_temperatures_are_refused_or_greedy():
    model = tiny()
    for t in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"temperature must be >= 0 and finite \\(0 is greedy\\), got {t}"):
            model.generate([[1, 2]], 3, temperature=t)
    prompt = codes_of(0, model, 20)
    greedy = model.generate([prompt], 15, temperature=0)
    for t in (1e-6, 1e-38, 1e-45, 1e-300):   # logits / t overflows float32: the draw becomes greedy
        for top_k in (None, 5):
            assert model.generate([prompt], 15, temperature=t, top_k=top_k) == greedy, (t, top_k)


def test_a_draw_never_picks_a_masked_code(monkeypatch):
    logits = torch.tensor([[float("-inf"), 1.0, float("-inf"), 3.0], [2.0, float("-inf"), float("-inf"), 0.5]])
    for draw in (None, fastgen.race):
        for t in (1.0, 1e-38):
            for top_k in (None, 3):
                for _ in range(50):
                    assert z.sample(logits, t, top_k, draw).tolist() in ([1, 0], [1, 3], [3, 0], [3, 3])
    # the exponential race divides by q ~ Exp(1); a q of 0 made 0 / 0 = NaN for a masked code,
    # which argmax takes for the largest
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, lambd=1: self.zero_())
    for top_k in (None, 3):
        assert z.sample(logits, 1.0, top_k, fastgen.race).tolist() in ([1, 0], [1, 3], [3, 0], [3, 3])

def test_the_context_holds_at_least_two_codes():
    for block_size in (1, 0):   # a full context keeps its last block_size // 2 codes: none of 1
        with pytest.raises(ValueError, match=f"^block_size={block_size}: must be >= 2 "):
            tiny(block_size=block_size)
    model = tiny(block_size=2)
    codes = codes_of(0, model, 12)
    assert len(model.generate([codes[:1]], 5, top_k=1)[0]) == 6 and likelihood.nll(model, codes) > 0

# -----------------------------------------------------------------------------
# precision and the static decoding step


def test_bf16_logits_stay_bf16_and_no_fp32_copy_of_them():
    # CPU autocast's own policy (tests/test_cuda_autocast.py runs CUDA's): the recorder sees any
    # new fp32 tensor of more than one row as wide as the vocabulary
    from cuda_autocast import Fp32Copies

    model = tiny(vocab_size=4000, disabled_ids=(EOT,)).train()
    row = codes_of(0, model)
    idx, tgt = torch.tensor([row[:-1]] * 2), torch.tensor([row[1:]] * 2)
    with torch.autocast("cpu", dtype=torch.bfloat16), Fp32Copies(4000) as watch:
        logits, loss = model(idx, tgt)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and watch.fp32_copies == [], watch.fp32_copies
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        dec, stepper = fastgen.StaticStepper(model.eval(), [row[:5]]), z.Stepper(model)
    # both decoders keep their KV cache in the compute dtype (zip2zip.cache_dtype decides it)
    assert dec.state["k"][0].dtype == dec.state["table_in"].dtype == stepper.k.dtype == torch.bfloat16
    assert fastgen.StaticStepper(model, [row[:5]]).state["k"][0].dtype == z.Stepper(model).k.dtype == torch.float32


def test_the_canonical_mask_allocates_nothing_the_size_of_the_logits():
    # the mask works on (B, T, K) tensors beside the logits (and writes -inf into them in place):
    # with it, forward and backward allocate exactly as many tensors of the logits' size as without
    from torch.utils._python_dispatch import TorchDispatchMode

    class Big(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.count = numel, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not (func.is_view or func._schema.is_mutable):   # new memory, not a view or an update
                self.count += sum(torch.is_tensor(t) and t.numel() >= self.numel
                                  for t in (out if isinstance(out, (tuple, list)) else [out]))
            return out

    counts = []
    for canonical in (True, False):
        model = tiny(vocab_size=4000, canonical=canonical).train()
        row = codes_of(0, model)
        idx, tgt = torch.tensor([row[:-1]] * 2), torch.tensor([row[1:]] * 2)
        hyper = model.hyper_batch(idx.tolist())
        big = Big(idx.numel() * 4000)
        with big:
            _, loss = model(idx, tgt, hyper=hyper)
            loss.backward()
        counts.append(big.count)
    assert counts[0] == counts[1], counts


def step_ops(model, greedy, batch=1):
    """The aten ops of one KV-cached decoding step of `batch` rows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    c = model.config
    rows = [z.lzw_encode(stream(7 + b, 400), V, c.max_codebook_size, c.max_subtokens, c.disabled_ids)
            for b in range(batch)]
    dec = fastgen.StaticStepper(model, [r[:100] for r in rows], temperature=0 if greedy else 1.0)
    with torch.no_grad():
        for t in range(100, 110):
            dec.advance([r[t] for r in rows])
        count = Count()
        with count:
            dec.advance([r[110] for r in rows])
    return count.ops


@pytest.mark.parametrize("greedy,batch", [(False, 1), (True, 1), (False, 8)])
def test_a_decoding_step_has_few_ops_and_no_host_sync(greedy, batch):
    # 6 layers, batch 1 as the GPU-readiness issue measures it, and batch 8 (no copies of the
    # step's input where rows are many); the count does not depend on width
    cfg = dict(block_size=256, n_layer=6, n_head=2, n_embd=32, max_codebook_size=256, hyper_n_embd=16, hyper_n_head=2)
    zip_ops, plain_ops = (step_ops(tiny(**cfg, max_subtokens=m), greedy, batch) for m in (M, 1))
    kernels = [[op for op in ops if not op.is_view] for ops in (zip_ops, plain_ops)]   # launches on a GPU
    assert len(kernels[0]) <= 1.4 * len(kernels[1]), [len(k) for k in kernels]
    syncs = {"_local_scalar_dense", "nonzero", "item", "masked_select", "is_nonzero", "equal", "unique"}
    assert not [op for op in zip_ops if op.__name__.split(".")[0] in syncs]
    assert sum(op.__name__.startswith("lift_fresh") for op in zip_ops) == 1     # one tensor from the host


def test_the_config_keeps_what_it_was_given():
    # hyper_n_embd=0 means "derived from n_embd" and stays 0: a copy with another n_embd (as
    # lib/adapt.py makes) derives its own width
    c = z.GPTConfig(n_embd=64, n_head=4, hyper_n_head=4)
    assert c.hyper_n_embd == 0 and c.hyper_width == 16
    assert dataclasses.replace(c, n_embd=128).hyper_width == 32
    assert z.GPTConfig(n_embd=64, n_head=4, hyper_n_embd=8, hyper_n_head=4).hyper_width == 8

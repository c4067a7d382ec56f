"""
Fast generation: the decoding step of zip2zip.Stepper for B rows at once, as one function of
fixed-shape tensors that compiles to one graph (a CUDA graph per step on a GPU), in the manner
of gpt-fast (DESIGN.md 6). zip2zip.py holds the plain loop, one row and one code at a time, which
this module must equal: tests/test_fastgen.py checks that the logits agree within 1e-5 (fp32) and
that greedy decoding writes the same codes, on ragged batches and past the context.

What it adds to the plain loop: a preallocated KV cache and, per row, a table of C + 1
hyper-embedding rows on the device; the host runs each row's LZW decoder and packs what changed
into one int64 tensor per step (one copy in, one read back of the drawn codes); nothing in the
step waits on the host. The exact vocabulary is zip2zip.vocabulary_logits_, the same function
training uses.
"""

import copy

import torch

from lib.checks import prompt_rows
from zip2zip import (NO_PARENT, cache_dtype, context_length, embed_contents, pad_contents, sample,
                     vocabulary_logits_)


# Table rows a step writes per row: the entry its code installed and the pending content. A
# canonical code installs at most one entry (its first base id ends the previous match; the rest
# follow its own path in the trie), so the hyper-encoder's work is not padded to the M entries a
# code may install; the rare code that installs more (a non-canonical stream) has the others
# written before the step (StaticStepper.advance).
SLOTS = 2


def race(probs):
    """A draw of one code per row from probs (B, W), as torch.multinomial's but with no host sync:
    argmax(p / q) with q ~ Exp(1), the "exponential race" (tests/test_fastgen.py checks that the
    two agree). Only codes of positive probability race: a masked code (p = 0) drawn with q = 0
    would score 0 / 0 = NaN, which argmax takes for the largest."""
    score = probs / torch.empty_like(probs).exponential_(1)
    return torch.where(probs > 0, score, -1.0).argmax(-1)


def decode_step(model, state, packed, temperature, top_k):
    """One decoding step of fixed-shape tensors, with no host sync: it compiles once.

    packed (F,) int64 holds what each row's LZW decoder found when it read the code (see
    StaticStepper._pack), field by field, each field for all B rows (so that every field is a
    contiguous view and nothing is copied): the code as a base id (0 if it is none) and as a
    table row (C if it is none), its slot in the KV cache (its position), n + 1 if a pending id
    exists else n (n: the entries installed), the id of the encoder's current match; then the
    SLOTS = 2 table rows to write (the entry the code installed, or the scratch row C, and row n
    for the pending content, or C), their (trie parent, first, last base id), and their contents
    and lengths. state: the StaticStepper's tensors, written in place. Returns the next-code logits
    (B, W) and a sampled next code per row (B,).
    """
    c, wte = model.config, model.transformer.wte.weight
    B, M, S = state["rows"].size(0), c.max_subtokens, SLOTS
    base_id, table_row, pos, n_valid, match = packed[:5 * B].view(5, B).unbind(0)     # (B,) each
    x = wte[base_id]                                                                # (B, d)
    if c.has_hypertokens:
        slots, trie, contents, lengths = packed[5 * B:].split([B * S, B * S * 3, B * S * M, B * S])
        slots, trie = slots.view(B, S), trie.view(B, S, 3)
        # 1. encode the new entry and the pending content, write them into the row's tables: the
        # entry at its row j, the pending vector at row n (its column V + n scores it)
        h_in, h_out = model.hyper_tables(contents.view(B * S, M), lengths)          # (B * S, d)
        rows = state["rows"]                                                        # (B, 1)
        state["table_in"][rows, slots] = h_in.view(B, S, -1).to(state["table_in"].dtype)
        if not c.tie_weights:
            state["table_out"][rows, slots] = h_out.view(B, S, -1).to(state["table_out"].dtype)
        state["trie"][rows, slots] = trie
        # 2. every code's embedding is read from its row's table: a hypertoken's from its row (which
        # holds it now, also when it is the pending id just installed), a base id's from the
        # scratch row C, where it is written first (C as a tensor, cols[-1:]: compiled, a constant
        # index would rewrite the whole table to change B rows)
        state["table_in"][rows[:, 0], state["cols"][-1:]] = x.to(state["table_in"].dtype)
        x = state["table_in"][rows[:, 0], table_row]
    x = (x + model.transformer.wpe(pos))[:, None]                                  # (B, 1, d)
    # 3. the blocks, each writing the code's key and value at its slot and attending to the slots
    # filled so far (plain forward: a training run may have compiled the blocks for its shapes)
    mask = (state["key_slots"] <= pos[:, None])[:, None, None, :]                   # (B, 1, 1, block)
    for i, block in enumerate(model.transformer.h):
        x = block.forward(x, mask, (state["k"][i], state["v"][i], pos[:, None]))
    x = model.transformer.ln_f(x)[:, 0]                                             # (B, d)
    logits = model.lm_head(x)                                                       # (B, V)
    if c.has_hypertokens:
        # 4. the hyper logits: column j < n is entry j, column n the pending id (DESIGN.md 2); the
        # mask is training's (zip2zip.vocabulary_logits_), with the trie facts of each table row
        hyper_logits = torch.einsum("bd,bkd->bk", x, state["table_out"])           # (B, C + 1)
        canon = (match, *state["trie"].unbind(-1)) if c.canonical else None       # (B,), (B, C + 1) x 3
        logits = vocabulary_logits_(logits, hyper_logits, n_valid, canon)            # (B, V + C + 1)
    dead = torch.isneginf(logits).all(-1)                                           # (B,): no valid code
    return logits, sample(logits, temperature, top_k, draw=race).masked_fill(dead, -1)


class StaticStepper:
    """zip2zip.Stepper for B rows of codes at once, with a static step; rows never affect each other.

    The host keeps each row's codes and its LZW decoder state (DESIGN.md 1.1); the device keeps
    fixed-shape tensors: the KV cache of every layer, each row's table of hyper-embeddings (C
    rows, plus a scratch row C where padded writes go) and each entry's trie parent, first and
    last base id (for the canonical mask). advance(codes) reads one code per row: the host
    pushes it into the row's decoder and packs what changed into one int64 tensor, copied to the
    device at once; decode_step then runs with no host sync, and one read back brings the sampled
    next codes (`next`). `logits` holds the next-code logits (B, V [+ C + 1]).

    A row whose context is full is cropped as zip2zip.context_length says (the kept codes' keys and
    values recomputed, outside the step, at positions from 0) and goes on; its codebook lives on.
    """

    @torch.no_grad()
    def __init__(self, model, prompts, temperature=1.0, top_k=None, compile=False):
        c, device = model.config, model.device
        dtype = cache_dtype(model)              # the KV cache's and the tables': the compute dtype
        if compile and dtype != model.transformer.wte.weight.dtype:
            # decode with a copy of the weights in that dtype, as gpt-fast does: under autocast, the
            # compiled step would cast every weight again at every call (the (V, d) output matrix too)
            model = copy.deepcopy(model).to(dtype)
        self.model, self.temperature, self.top_k = model, temperature, top_k
        self.rows = [list(p) for p in prompts]
        self.lzw = [model.codec() for _ in prompts]
        B, nh, hs = len(self.rows), c.n_head, c.n_embd // c.n_head
        zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)
        # one cache per layer (not views of one tensor), so that the compiled step writes a code's
        # key and value into it in place (the attention's indexed assignment)
        self.state = {"k": [zeros(B, nh, c.block_size, hs) for _ in range(c.n_layer)],
                      "v": [zeros(B, nh, c.block_size, hs) for _ in range(c.n_layer)],
                      "key_slots": torch.arange(c.block_size, device=device),
                      "cols": torch.arange(c.max_codebook_size + 1, device=device),
                      "rows": torch.arange(B, device=device)[:, None]}
        if c.has_hypertokens:
            self.state["table_in"] = zeros(B, c.max_codebook_size + 1, c.n_embd)
            self.state["table_out"] = self.state["table_in"] if c.tie_weights else torch.zeros_like(self.state["table_in"])
            # the trie facts of each row's hyper columns, as zip2zip.canon_facts builds them for one
            # position, kept up to date by the host: a row holds nobody's child until it is written.
            # (Built in the step, they would cost the step five more kernel launches.)
            nobody = torch.tensor([NO_PARENT, 0, 0], device=device)
            self.state["trie"] = nobody.repeat(B, c.max_codebook_size + 1, 1)
        self.step = decode_step
        if compile:
            if device.type == "cuda":   # CUDA graphs need tensors that stay where they are
                for t in self.state.values():
                    for x in t if isinstance(t, list) else [t]:
                        torch._dynamo.mark_static_address(x)
            self.step = torch.compile(decode_step, fullgraph=True,
                                      mode="reduce-overhead" if device.type == "cuda" else None)
        # read the prompts: every row's decoder state, the entries they installed, the cache
        for lzw, row in zip(self.lzw, self.rows):
            for t, code in enumerate(row):
                lzw.push(code, t)
        if c.has_hypertokens:
            self._install([(b, j) for b, lzw in enumerate(self.lzw) for j in range(len(lzw.entries))])
        self.filled = [0] * B     # codes in each row's cache
        last = [row[-1] for row in self.rows]
        # each row's context as zip2zip.Stepper leaves it after reading the prompt
        self._refill(slice(None), [row[len(row) - context_length(len(row), c.block_size):-1] for row in self.rows])
        self._run([self._pack(b, last[b], ()) for b in range(B)])

    def _install(self, new):
        """Encode and write the entries (row, j) in one hyper-encoder call (prompts, gather)."""
        if not new:
            return
        c, device = self.model.config, self.model.device
        h_in, h_out = embed_contents(self.model, [self.lzw[b].entries[j] for b, j in new])
        rows, cols = (torch.tensor(v, device=device) for v in zip(*new))
        self.state["table_in"][rows, cols] = h_in.to(self.state["table_in"].dtype)
        if not c.tie_weights:   # tied: table_out is table_in, written just now
            self.state["table_out"][rows, cols] = h_out.to(self.state["table_out"].dtype)
        self.state["trie"][rows, cols] = torch.tensor([self.lzw[b].nodes([j])[0] for b, j in new], device=device)

    def _refill(self, rows, codes):
        """Recompute keys and values of codes (one list per row of the slice `rows`) at slots and
        positions 0, 1, ... (right-padded, masked). For the prompts, and to crop a full row."""
        m, c, device = self.model, self.model.config, self.model.device
        L = max(map(len, codes))
        for b, r in zip(range(len(self.rows))[rows], codes):
            self.filled[b] = len(r)
        if L == 0:
            return
        idx = torch.tensor([r + [0] * (L - len(r)) for r in codes], device=device)          # (R, L)
        lengths = torch.tensor([len(r) for r in codes], device=device)[:, None, None]      # (R, 1, 1)
        table = self.state["table_in"][rows, :c.max_codebook_size] if c.has_hypertokens else \
            m.transformer.wte.weight.new_zeros(idx.size(0), 0, c.n_embd)
        slots = torch.arange(L, device=device)
        x = m.embed_codes(idx, m.transformer.wte.weight, table, c.vocab_size) + m.transformer.wpe(slots)
        # causal over the row's own codes; a pad query sees code 0, and so does every query of a
        # row with no codes (a one-code prompt): no row of the mask is empty, which some CUDA
        # kernels answer with NaN. What pads compute is never read: the step overwrites their slots.
        # Attention reads the first L slots of the cache (views: the keys and values are written
        # through them), not all block_size: a short prompt costs its own length, not the context's.
        keys = self.state["key_slots"][:L]
        mask = (keys <= slots[:, None]) & (keys < lengths.clamp(min=1))                    # (R, L, L)
        for i, block in enumerate(m.transformer.h):
            x = block.forward(x, mask[:, None], (self.state["k"][i][rows, :, :L], self.state["v"][i][rows, :, :L],
                                                 slots.expand(idx.size(0), L)))

    def _pack(self, b, code, new):
        """Row b's part of a step's input (see decode_step), a list per field: the code it reads,
        and the entry `new` (a range of at most one index j) that reading it installed."""
        c, lzw = self.model.config, self.lzw[b]
        V, C, M = c.vocab_size, c.max_codebook_size, c.max_subtokens
        pending, n = lzw.pending(), len(lzw.entries)
        head = [[code if code < V else 0], [code - V if code >= V else C], [self.filled[b]],
                [n + (pending is not None)], [lzw.buf]]
        self.filled[b] += 1
        if not c.has_hypertokens:
            return head
        pad = SLOTS - 1 - len(new)
        slots = list(new) + [C] * pad + [n if pending else C]
        # the new entries' trie nodes, then column n as canon_facts has it: the pending id, nobody's child
        trie = lzw.nodes(new) + [(NO_PARENT, 0, 0)] * pad + [(NO_PARENT, pending[0] if pending else 0, 0)]
        contents = [lzw.entries[j] for j in new] + [(0,)] * pad + [pending or (0,)]
        return head + [slots, [t for e in trie for t in e],
                       [t for e in pad_contents(contents, M) for t in e], [len(e) for e in contents]]

    def _run(self, parts):
        # one host-to-device copy of the step's input (field by field: see decode_step), one
        # read back of the chosen codes
        packed = torch.tensor([v for field in zip(*parts) for row in field for v in row], dtype=torch.long)
        if self.model.device.type == "cuda":
            packed = packed.pin_memory().to(self.model.device, non_blocking=True)
        self.logits, nxt = self.step(self.model, self.state, packed, self.temperature, self.top_k)
        self.next = nxt.tolist()

    @torch.no_grad()
    def advance(self, codes):
        """Read one code per row (ValueError if a code is not valid for its row), then compute
        the next-code logits and draw the next codes."""
        c, parts, more = self.model.config, [], []
        for b, (lzw, code) in enumerate(zip(self.lzw, codes)):
            n = len(lzw.entries)
            lzw.push(code, len(self.rows[b]))
            self.rows[b].append(code)
            keep = context_length(len(self.rows[b]), c.block_size) - 1   # the codes before this one that stay
            if keep < self.filled[b]:            # the context is full: crop it as zip2zip.context_length says
                self._refill(slice(b, b + 1), [self.rows[b][len(self.rows[b]) - 1 - keep:-1]])
            more += [(b, j) for j in range(n + 1, len(lzw.entries))]   # beyond the one the step writes
            parts.append(self._pack(b, code, range(n, min(n + 1, len(lzw.entries)))))
        self._install(more)
        self._run(parts)


def copy_lzw(lzw):
    """An independent copy of an LZW state (its entries are tuples: shared safely)."""
    new = copy.copy(lzw)
    new.entries, new.parents, new.edges = list(lzw.entries), list(lzw.parents), dict(lzw.edges)
    return new


def gather_rows(parts):
    """A new (eager) StaticStepper of the rows (stepper, row) in `parts`, in order (the beam of
    multiview.prefix_nlls, whose paths branch from the rows of earlier steps)."""
    new, d0 = StaticStepper.__new__(StaticStepper), parts[0][0]
    new.__dict__.update(d0.__dict__, step=decode_step)
    rows = lambda tensors: torch.cat([x[r:r + 1] for x, (_, r) in zip(tensors, parts)])   # row r of each
    new.state = dict(d0.state)      # the rest of the state is shared
    for t in ("table_in", "table_out", "trie"):
        if t in new.state:
            new.state[t] = rows([d.state[t] for d, _ in parts])
    for t in ("k", "v"):            # one tensor per layer
        new.state[t] = [rows([d.state[t][i] for d, _ in parts]) for i in range(len(d0.state[t]))]
    if "table_out" in new.state and d0.state["table_out"] is d0.state["table_in"]:
        new.state["table_out"] = new.state["table_in"]
    new.state["rows"] = torch.arange(len(parts), device=d0.model.device)[:, None]
    new.rows = [list(d.rows[r]) for d, r in parts]
    new.lzw = [copy_lzw(d.lzw[r]) for d, r in parts]
    new.filled = [d.filled[r] for d, r in parts]
    new.logits = torch.cat([d.logits[r:r + 1] for d, r in parts])
    return new


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, compile=False):
    """GPT.generate through the static step, all rows at once. compile=True compiles the step once
    (one CUDA graph per step on a GPU)."""
    stepper = StaticStepper(model, prompt_rows(idx, temperature, top_k, max_new_tokens), temperature, top_k, compile)
    for _ in range(max_new_tokens):
        dead = [b for b, code in enumerate(stepper.next) if code < 0]
        if dead:   # only possible with a canonical model and no disabled id (DESIGN.md 2.1)
            raise ValueError(f"row {dead[0]} has no valid next code: every code is masked")
        stepper.advance(stepper.next)                                   # read the codes just drawn
    out = stepper.rows
    return torch.tensor(out, dtype=idx.dtype, device=idx.device) if torch.is_tensor(idx) else out

"""What a trained network does inside one passage, as numbers: the views of `gptnano inspect`.

``look_inside(net, tokenizer, text)`` runs the passage through the network and returns a dict of
plain lists, numbers and strings; ``page(data)`` embeds exactly that dict, as JSON, in a
self-contained HTML page (``views.html`` beside this file) that draws it. The views: surprisal
and the top next characters for every model; attention maps (GPT, and the Backpack's
contextualization transformer); the RNN's hidden states and the units that track simple features;
which senses carry a Backpack's prediction; a CNN's receptive field and input attribution.
docs/inspect.md says how to read them and lists every key.

Every number is the network's own fp32 value, in eval mode (nothing random is drawn), read from
the model's own methods (``CausalSelfAttention.probabilities``, ``Backpack.sense_weights``,
``sense_logits``) or from hooks on its layers, never from a second implementation; it is written
as the shortest decimal that reads back as the same fp32 number. Torch only, no Lightning.
"""

import copy
import html
import json
import re
from contextlib import contextmanager
from importlib import resources

import numpy as np
import torch
from torch import nn

from gptnano.data.tokenizer import default_prompt
from gptnano.errors import UserError
from gptnano.models.backpack import Backpack
from gptnano.models.base import LanguageModel
from gptnano.models.cnn import CNN
from gptnano.models.gpt import CausalSelfAttention
from gptnano.models.rnn import ElmanLayer
from gptnano.sampling import generate

FORMAT, VERSION = "gptnano-inspect", 1  # the JSON's "format" and "version"
DOC = "docs/inspect.md"  # how to read the page, in the gptnano repository; the page links to it
TOP_NEXT = 5  # next characters listed per position
TOP_SENSE_CHARS = 5  # characters listed per sense
TOP_CONTRIBUTIONS = 8  # (position, sense) pairs listed per Backpack prediction
TOP_UNITS = 8  # RNN units listed per feature
SATURATED = 0.95  # |h| beyond this counts as a saturated tanh unit

# A few lines in the style of tiny Shakespeare (written for gptnano): the passage when none is given.
PASSAGE = """DUKE:
Go, call the watch, and bid them keep the gate;
The night is old, and yet the town is loud.

LUCIO:
My lord, I went, but found no watchman there;
They drink, and swear the moon will guard the walls.
"""


# ----- the whole page's numbers -------------------------------------------------------------


def look_inside(net: LanguageModel, tokenizer, text: str, *, max_chars: int | None = None,
                source: str | None = None) -> dict:
    """Every view of ``net`` reading ``text``, as the JSON ``page`` embeds (keys: docs/inspect.md).

    Args:
        net: A trained network (any gptnano architecture); used in eval mode and fp32, and left
            as it was (a network in another dtype is copied to fp32).
        tokenizer: Its tokenizer (``gptnano.checkpoint.load_net`` returns both).
        text: The passage: at least 2 tokens, at most ``passage_limit(net, max_chars)``.
        max_chars: Read a longer passage than ``block_size`` (the RNN and the CNN only).
        source: Where the network came from (a checkpoint's path), shown on the page.

    Returns:
        A dict of plain lists, floats, ints and strings (T is the passage's length in tokens, V the
        vocabulary's size): ``surprisal[T]`` (nats; ``None`` for the first token), ``mean_loss``,
        ``top_ids[T][5]`` and ``top_probs[T][5]``, and ``attention``, ``rnn``, ``backpack``, ``cnn``
        (each ``None`` where the architecture has no such part).

    Raises:
        UserError: characters outside the vocabulary, or a passage too short or too long.
    """
    ids = passage_ids(net, tokenizer, text, max_chars)
    if any(p.dtype != torch.float32 for p in net.parameters()):
        net = copy.deepcopy(net).float()
    ids = ids.to(next(net.parameters()).device)
    with evaluating(net), torch.no_grad():
        logp = predictions(net, ids).log_softmax(dim=-1)  # (T, V), fp32
        surprisal = -logp[:-1].gather(1, ids[1:, None])[:, 0]  # (T - 1,): -log p(x_{t+1} | x_<=t)
        top = logp.exp().topk(min(TOP_NEXT, logp.size(1)), dim=-1)
        predicted = logp.argmax(dim=-1)  # (T,)
        # What a view explains at position t: the character that came next, and at the end of the
        # passage (where none came) the model's most likely one.
        target = torch.cat([ids[1:], predicted[-1:]])
        tokens = token_texts(tokenizer)
        return {
            "format": FORMAT, "version": VERSION, "doc": DOC, "source": source,
            "model": {"architecture": type(net).__name__, "parameters": net.num_params(),
                      "vocab_size": net.vocab_size, "block_size": net.block_size, "tokenizer": tokenizer.kind},
            "text": text, "vocab": tokens, "ids": ids.tolist(),
            "surprisal": [None, *plain(surprisal)], "mean_loss": plain(surprisal.mean()),
            "top_ids": top.indices.tolist(), "top_probs": plain(top.values),
            "attention": attention_view(net, ids),
            "rnn": rnn_view(net, ids, [tokens[i] for i in ids.tolist()]),
            "backpack": backpack_view(net, ids, predicted),
            "cnn": cnn_view(net, ids, target),
        }


def passage_limit(net: LanguageModel, max_chars: int | None = None) -> int:
    """The most tokens a passage may have: ``block_size``, or ``max_chars`` for a network that
    reads any length (the RNN; the CNN, whose every position reads only its receptive field)."""
    if max_chars is None:
        return net.block_size
    if not reads_any_length(net):
        raise UserError(f"--max_chars: a {type(net).__name__} reads at most block_size={net.block_size} tokens at "
                        "once (its learned positions end there); only an RNN or a CNN reads longer passages")
    if max_chars < 2:
        raise UserError(f"--max_chars must be at least 2, got {max_chars}")
    return max_chars


def passage_ids(net: LanguageModel, tokenizer, text: str, max_chars: int | None = None) -> torch.Tensor:
    """``text`` as token ids ``[T]``, or one line saying why it cannot be read whole."""
    ids = tokenizer.encode(text)  # a UserError naming any character outside the vocabulary
    limit = passage_limit(net, max_chars)
    unit = "characters" if tokenizer.kind == "char" else "tokens"
    if len(ids) > limit:
        more = " (--max_chars reads more)" if reads_any_length(net) and max_chars is None else ""
        raise UserError(f"the passage has {len(ids)} {unit}; this {type(net).__name__} reads at most {limit} at "
                        f"once{more}: give a shorter one")
    if len(ids) < 2:
        raise UserError(f"the passage has {len(ids)} {unit}: it needs at least 2, one to predict from and one to score")
    return ids


def default_passage(net: LanguageModel, tokenizer, max_chars: int | None = None) -> str:
    """The passage when none is given: ``PASSAGE`` cut to the limit; for a model whose vocabulary
    lacks its characters, the model's own greedy continuation of the default prompt (nothing random)."""
    limit = passage_limit(net, max_chars)
    if not tokenizer.unknown(PASSAGE):
        return tokenizer.decode(tokenizer.encode(PASSAGE)[:limit].tolist())
    prompt = tokenizer.encode(default_prompt(tokenizer))[None, :]
    with evaluating(net):
        return tokenizer.decode(generate(net, prompt, limit - prompt.size(1), temperature=0)[0].tolist())


def token_texts(tokenizer) -> list[str]:
    """The text of every token id: a character tokenizer's characters; for bytes, the ASCII
    character or ``\\xNN``."""
    if tokenizer.kind == "char":
        return list(tokenizer.vocab)
    return [chr(b) if b < 128 else f"\\x{b:02x}" for b in range(len(tokenizer))]


def reads_any_length(net: LanguageModel) -> bool:
    return net.max_context is None or isinstance(net, CNN)


def plain(t: torch.Tensor):
    """A tensor as nested lists of Python floats (a float for a 0-d tensor), each the shortest
    decimal that reads back as the same fp32 number: exact, and about half the JSON of float64's."""
    a = t.detach().float().cpu().numpy()
    return a.astype(str).astype(np.float64).tolist()  # numpy writes float32 in its shortest form


@contextmanager
def evaluating(net: nn.Module):
    """``net`` in eval mode (no dropout) inside the block, as it was after."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


# ----- the model's own numbers, read through hooks ------------------------------------------


@contextmanager
def recording(modules: list[nn.Module], pick):
    """Inside the block, ``seen[k]`` is ``pick(inputs, output)`` of the last call of ``modules[k]``."""
    seen = [None] * len(modules)

    def hook(k):
        return lambda module, inputs, output: seen.__setitem__(k, pick(inputs, output))

    handles = [m.register_forward_hook(hook(k)) for k, m in enumerate(modules)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def predictions(net: LanguageModel, ids: torch.Tensor) -> torch.Tensor:
    """``net``'s logits ``[T, V]`` for the passage ``ids[T]``: one forward pass. A CNN may read more
    than ``block_size`` tokens here: a convolution has no fixed context (each position reads its
    receptive field), so the length check that guards learned positions is lifted for it."""
    if isinstance(net, CNN) and len(ids) > net.block_size:
        net.check_length = lambda idx: None  # shadows the method on this instance, for this one call
        try:
            return net(ids[None])[0]
        finally:
            del net.check_length
    return net(ids[None])[0]


@torch.no_grad()
def attention_maps(net: LanguageModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """What every causal self-attention layer of ``net`` attends to, reading ``ids[T]``: one
    ``[n_head, T, T]`` tensor per layer, row i over the positions j it looks at (a softmax: row i
    sums to 1 over j <= i, 0 above the diagonal). Each is the layer's own ``probabilities`` of the
    input it received in a forward pass; an empty list for a network without attention."""
    layers = [m for m in net.modules() if isinstance(m, CausalSelfAttention)]
    with recording(layers, lambda inputs, output: inputs[0]) as inputs:
        predictions(net, ids)
    return [layer.probabilities(x)[0] for layer, x in zip(layers, inputs)]


@torch.no_grad()
def hidden_states(net: LanguageModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every Elman layer's hidden states h_t reading ``ids[T]``: one ``[T, n_hidden]`` tensor per
    layer (tanh units, in [-1, 1]), as the layer itself returned them in a forward pass."""
    layers = [m for m in net.modules() if isinstance(m, ElmanLayer)]
    with recording(layers, lambda inputs, output: output[0]) as states:
        predictions(net, ids)
    return [hs[0] for hs in states]


@torch.no_grad()
def sense_table(net: Backpack) -> torch.Tensor:
    """What each sense of each token says on its own, ``[V, n_senses, V]``: row ``[v, l]`` is
    ``sense_logits(v)[l]``, the logits sense l of token v adds wherever it is weighted by 1."""
    return torch.stack([net.sense_logits(v) for v in range(net.vocab_size)])


def sense_weights(net: Backpack, ids: torch.Tensor) -> torch.Tensor:
    """alpha ``[n_senses, T, T]`` as the Backpack's forward uses it: ``sense_weights`` times ``sense_scale``
    (ones, unless a ``scaled_sense`` block is editing a sense)."""
    return net.sense_weights(ids[None])[0] * net.sense_scale[:, None, None]


@torch.no_grad()
def sense_contributions(net: Backpack, ids: torch.Tensor, targets: torch.Tensor | None = None,
                        table: torch.Tensor | None = None) -> torch.Tensor:
    """How much sense l of position j adds to the logits at position i: ``alpha[l, i, j] * (C(x_j)[l] @ E^T)``.

    A Backpack's logits are ``E o_i`` with ``o_i = sum_j sum_l alpha[l, i, j] C(x_j)[l]`` and nothing
    after the sum, so these add up to the logits exactly (to float rounding).

    Args:
        net: A Backpack.
        ids: The passage ``[T]``.
        targets: ``[T]`` token ids: keep only the logit of ``targets[i]`` at position i.
        table: ``sense_table(net)``, when the caller has it already.

    Returns:
        ``[T, T, n_senses, V]`` (i, j, l, v), or ``[T, T, n_senses]`` with ``targets``.
    """
    alpha = sense_weights(net, ids)  # (L, T, T)
    says = (sense_table(net) if table is None else table)[ids]  # (T_j, L, V): each position's senses' logits
    if targets is None:
        return torch.einsum("lij,jlv->ijlv", alpha, says)
    return torch.einsum("lij,jli->ijl", alpha, says[:, :, targets])  # says[j, l, targets[i]]


def input_attribution(net: LanguageModel, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How much each input moved each prediction: ``[T, T]``, row t, column j is
    ``|| d log p(targets[t] | x_<=t) / d e_j ||_2``, with e_j the token embedding of position j
    (the output of ``net.wte``) and the L2 norm over its channels. Causality makes it 0 for j > t;
    a CNN's receptive field makes it 0 for j <= t - receptive_field. One backward pass per row."""
    leaves = []

    def as_leaf(module, inputs, output):  # the embeddings become the tensor autograd differentiates against
        leaves.append(output.detach().requires_grad_())
        return leaves[-1]

    handle = net.wte.register_forward_hook(as_leaf)
    try:
        with torch.enable_grad():
            logp = predictions(net, ids).log_softmax(dim=-1)  # (T, V)
            rows = [torch.autograd.grad(logp[t, target], leaves[0], retain_graph=True)[0][0].norm(dim=-1)
                    for t, target in enumerate(targets.tolist())]
    finally:
        handle.remove()
    return torch.stack(rows)  # (T, T)


# ----- one view per architecture --------------------------------------------------------------


def attention_view(net: LanguageModel, ids: torch.Tensor) -> dict | None:
    """``{"n_layer", "n_head", "maps": [layer][head][i][j]}``, or None without attention."""
    maps = attention_maps(net, ids)
    if not maps:
        return None
    return {"n_layer": len(maps), "n_head": maps[0].size(0), "maps": [plain(m) for m in maps]}


def features(tokens: list[str]) -> dict[str, list[float]]:
    """Simple facts about each position t of a passage (its tokens' texts), that a hidden state
    read up to t could track:

    - ``inside_quotes``: 1 from an opening double quote (``"`` or ``“``) up to, not including, its closing one;
    - ``line_position``: characters read since the last newline (a newline itself is 0);
    - ``after_newline``: 1 where the character just read is a newline;
    - ``in_word``: 1 where it is a letter.
    """
    quoted, column, out = False, 0, {"inside_quotes": [], "line_position": [], "after_newline": [], "in_word": []}
    for c in tokens:
        if c in '"“”':
            quoted = c == "“" or (c == '"' and not quoted)
        column = 0 if c == "\n" else column + 1
        for name, value in (("inside_quotes", quoted), ("line_position", column), ("after_newline", c == "\n"),
                            ("in_word", c.isalpha())):
            out[name].append(float(value))
    return out


def unit_finder(states: list[torch.Tensor], feats: dict[str, list[float]], k: int = TOP_UNITS) -> dict[str, list]:
    """For each feature, the ``k`` hidden units whose values over the passage best track it: the
    highest |Pearson correlation| over positions, as ``{"layer", "unit", "r"}``, strongest first.
    Empty for a feature that does not vary over the passage (no correlation is defined)."""
    h = torch.cat(states, dim=1).double()  # (T, layers * n_hidden)
    h = h - h.mean(0)
    found = {}
    for name, series in feats.items():
        f = torch.tensor(series, dtype=torch.float64, device=h.device)
        f = f - f.mean()
        if f.norm() == 0:
            found[name] = []
            continue
        denominator = f.norm() * h.norm(dim=0)  # (units,); 0 for a unit that never changes: r = 0
        r = torch.where(denominator > 0, (f @ h) / denominator, torch.zeros_like(denominator))
        best = r.abs().topk(min(k, r.numel())).indices.tolist()
        n_hidden = states[0].size(1)
        found[name] = [{"layer": u // n_hidden, "unit": u % n_hidden, "r": plain(r[u])} for u in best]
    return found


def rnn_view(net: LanguageModel, ids: torch.Tensor, tokens: list[str]) -> dict | None:
    """``{"n_hidden", "states": [layer][t][unit], "saturation": [layer], "features": {name: [t]},
    "finder": {name: [{"layer", "unit", "r"}]}}``, or None for a network without Elman layers."""
    states = hidden_states(net, ids)
    if not states:
        return None
    feats = features(tokens)
    return {"n_hidden": states[0].size(1), "states": [plain(s) for s in states],
            "saturation": [plain((s.abs() > SATURATED).float().mean()) for s in states],
            "features": feats, "finder": unit_finder(states, feats)}


def backpack_view(net: LanguageModel, ids: torch.Tensor, predicted: torch.Tensor) -> dict | None:
    """For each position, the (position, sense) pairs that raise the logit of the predicted and
    of the actual next character most, and for every token's every sense the characters it raises
    most; None for a network that is not a Backpack (keys: docs/inspect.md)."""
    if not isinstance(net, Backpack):
        return None
    table = sense_table(net)  # (V, L, V)
    top = table.topk(min(TOP_SENSE_CHARS, net.vocab_size), dim=-1)
    view = {"n_senses": net.n_senses, "sense_top_ids": top.indices.tolist(), "sense_top_logits": plain(top.values)}
    alpha, T, L = sense_weights(net, ids), len(ids), net.n_senses
    # The actual next character is known before the last position only; the last row's is a stand-in, left out.
    for name, targets, known in (("predicted", predicted, T), ("actual", torch.cat([ids[1:], predicted[-1:]]), T - 1)):
        parts = sense_contributions(net, ids, targets, table)[:known]  # (known, T_j, L)
        future = torch.ones(known, T, dtype=torch.bool, device=ids.device).triu(diagonal=1)  # j > i: no part at all
        best = parts.masked_fill(future[:, :, None], float("-inf")).flatten(1).topk(min(TOP_CONTRIBUTIONS, T * L))
        rows = [[{"from": jl // L, "sense": jl % L, "weight": plain(alpha[jl % L, i, jl // L]), "logit": value}
                 for jl, value in zip(best.indices[i].tolist(), plain(best.values[i])) if jl // L <= i]
                for i in range(known)]  # entries j * L + l, largest first
        missing = [None] * (T - known)
        view[name] = {"target": targets[:known].tolist() + missing, "logit": plain(parts.sum(dim=(1, 2))) + missing,
                      "top": rows + [[]] * (T - known)}
    return view


def cnn_view(net: LanguageModel, ids: torch.Tensor, target: torch.Tensor) -> dict | None:
    """``{"receptive_field", "kernel_size", "dilations", "target": [t], "attribution": [t][j],
    "norm"}``, or None for a network that is not a CNN."""
    if not isinstance(net, CNN):
        return None
    return {"receptive_field": net.receptive_field, "kernel_size": net.blocks[0].conv.weight.size(-1),
            "dilations": list(net.dilations), "target": target.tolist(),
            "attribution": plain(input_attribution(net, ids, target)),
            "norm": "L2 norm over the token embedding's channels of d log p(target) / d embedding"}


# ----- the page --------------------------------------------------------------------------------


def page(data: dict) -> str:
    """The self-contained HTML page that draws ``data`` (what ``look_inside`` returned): the
    template ``views.html`` with the data as JSON in ``<script type="application/json"
    id="gptnano-data">``. It loads nothing from the network and opens in any browser offline."""
    # "<", ">" and "&" escaped inside the JSON, so that no text in the passage can end the script element.
    payload = (json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
               .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
    model = data["model"]
    title = f"gptnano inspect: {model['architecture']}" + (f" ({data['source']})" if data.get("source") else "")
    template = resources.files("gptnano").joinpath("views.html").read_text(encoding="utf-8")
    fill = {"TITLE": html.escape(title), "DATA": payload}
    return re.sub(r"\{\{(TITLE|DATA)\}\}", lambda m: fill[m.group(1)], template)  # one pass: no text is read twice

"""Tree forwards and KV compaction: every tree row scores like plain decoding of its path, and a cache compacted to
an accepted path is the cache plain decoding would have built, on tiny Llama, Gemma 3 (sliding windows smaller than
the context), Qwen2 (mixed layers) and Mistral (all sliding), under eager and sdpa attention."""

import functools

import pytest
import torch
from stats_helpers import tiny_llama
from transformers import DynamicCache

from refdecode import kernels
from refdecode.tree import DraftTree
from refdecode.tree_attention import additive_mask, ancestor_matrix, keep_rows, supports_tree, tree_forward

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given = hypothesis.given

VOCAB = 96
ATOL = 1e-4

# name -> (family, attention, sliding window); windows are smaller than most contexts below, so they matter
MODELS = {
    "llama-eager": ("llama", "eager", None),
    "llama-sdpa": ("llama", "sdpa", None),
    "gemma3-w4-eager": ("gemma3", "eager", 4),
    "gemma3-w7-sdpa": ("gemma3", "sdpa", 7),
    "qwen2-mixed-w5-sdpa": ("qwen2", "sdpa", 5),
    "mistral-w6-eager": ("mistral", "eager", 6),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@functools.cache
def model_named(name: str):
    family, attention, window = MODELS[name]
    model = build_model(family, window)
    model.set_attn_implementation(attention)
    return model


def build_model(family: str, window: int | None):
    """A random tiny model of `family` built from a config (no weights downloaded)."""
    if family == "llama":
        return tiny_llama(vocab_size=VOCAB, seed=0)
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)  # weight init only
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
    )
    if family == "gemma3":
        layers = ["sliding_attention", "full_attention", "sliding_attention"]
        config = Gemma3TextConfig(**shape, num_hidden_layers=3, sliding_window=window, layer_types=layers)
        return Gemma3ForCausalLM(config).eval()
    if family == "qwen2":  # layer 0 full, layer 1 sliding
        config = Qwen2Config(
            **shape, num_hidden_layers=2, use_sliding_window=True, sliding_window=window, max_window_layers=1
        )
        return Qwen2ForCausalLM(config).eval()
    config = MistralConfig(**shape, num_hidden_layers=2, sliding_window=window)
    return MistralForCausalLM(config).eval()


@st.composite
def trees(draw, max_nodes: int = 10) -> DraftTree:
    """Random trees, often chain-like so that some grow deeper than the sliding windows."""
    n = draw(st.integers(1, max_nodes))
    tokens: list[int] = []
    parents: list[int] = []
    for i in range(n):
        parent = draw(st.one_of(st.just(i - 1), st.integers(-1, i - 1)))
        token = draw(st.integers(0, VOCAB - 1))
        while (parent, token) in zip(parents, tokens, strict=True):  # siblings differ
            token = (token + 1) % VOCAB
        parents.append(parent)
        tokens.append(token)
    return DraftTree(tokens, parents)


def prefill(model, context: list[int], *, config: bool = True) -> DynamicCache:
    """A cache holding `context`, recording its past as the decode loop does after its prefill."""
    cache = DynamicCache(config=model.config) if config else DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([context]), cache=cache, use_cache=True)
    cache.activate_past_recording()
    return cache


def plain_logits(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] float32 logits of one cacheless forward: the model's own causal (and sliding) masks."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def expected_rows(model, context: list[int], pending: int, tree: DraftTree) -> torch.Tensor:
    """[len(tree) + 1, V]: each row computed by plain decoding of its path (one forward per leaf's path)."""
    rows = torch.empty(len(tree) + 1, model.config.vocab_size)
    parents = set(tree.parents)
    for leaf in [i for i in range(len(tree)) if i not in parents] or [ROOT_ONLY]:
        path = [] if leaf == ROOT_ONLY else tree.path(leaf)
        logits = plain_logits(model, context + [pending] + [tree.tokens[i] for i in path])
        base = len(context)
        rows[0] = logits[base]
        for depth, node in enumerate(path, start=1):
            rows[node + 1] = logits[base + depth]
    return rows


ROOT_ONLY = -1


def accepted_rows(tree: DraftTree, node: int) -> list[int]:
    """The flat rows of the path root..node (node = -1: the pending token alone)."""
    return [0] + [i + 1 for i in (tree.path(node) if node >= 0 else [])]


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float = ATOL) -> None:
    err = (got - want).abs().max().item()
    assert err <= atol, f"max |tree - plain| = {err:.3g}"


@pytest.mark.fuzz
@given(
    name=st.sampled_from(list(MODELS)),
    context=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40),
    pending=st.integers(0, VOCAB - 1),
    tree=trees(),
    route=st.booleans(),
)
def test_every_tree_row_scores_like_plain_decoding_of_its_path(name, context, pending, tree, route):
    """Also with the routed CPU kernels (refdecode.kernels: transposed products, SDPA's enable_gqa with the mask)."""
    model = model_named(name)
    cache = prefill(model, context)
    with kernels.routed(model, len(tree) + 1, force=route):
        got = tree_forward(model, cache, pending, tree)  # [n + 1, V]
    assert got.dtype == torch.float32 and got.shape == (len(tree) + 1, VOCAB)
    assert_close(got, expected_rows(model, context, pending, tree))
    assert cache.get_seq_length() == len(context) + len(tree) + 1


@pytest.mark.fuzz
@given(
    name=st.sampled_from(list(MODELS)),
    context=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30),
    steps=st.lists(
        st.tuples(st.integers(0, VOCAB - 1), trees(max_nodes=8), st.integers(-2, 7)), min_size=2, max_size=4
    ),
)
def test_rounds_of_tree_steps_and_compaction_stay_equal_to_plain_decoding(name, context, steps):
    """Each step: a tree forward, then keep a random root-to-node path (often not a prefix of the flat order;
    choice -2 keeps nothing, -1 the pending token alone). Every forward after a compaction must score like plain
    decoding of everything kept so far."""
    model = model_named(name)
    cache = prefill(model, context)
    committed = list(context)
    for pending, tree, choice in steps:
        past = cache.get_seq_length()
        assert past == len(committed)
        assert_close(tree_forward(model, cache, pending, tree), expected_rows(model, committed, pending, tree))
        node = min(choice, len(tree) - 1)
        rows = [] if node == -2 else accepted_rows(tree, node)
        keep_rows(cache, past, rows)
        if rows:
            committed += [pending] + [tree.tokens[i] for i in tree.path(node)]
        assert cache.get_seq_length() == len(committed)


@pytest.mark.parametrize("name", list(MODELS))
def test_compacted_cache_is_the_cache_of_one_token_at_a_time_decoding(name):
    """Rows, lengths and contents per layer, for a path that skips the first branch of the flat order."""
    model = model_named(name)
    context = [(7 * i + 3) % VOCAB for i in range(13)]
    tree = DraftTree([5, 9, 11, 12, 40, 41, 42], [-1, -1, 0, 1, 3, 4, 5])  # accept node 6: path 1, 3, 4, 5, 6
    cache = prefill(model, context)
    past = cache.get_seq_length()
    tree_forward(model, cache, 17, tree)
    keep_rows(cache, past, accepted_rows(tree, 6))

    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        for token in context + [17, 9, 12, 40, 41, 42]:
            model(input_ids=torch.tensor([[token]]), cache=plain, use_cache=True)
    assert cache.get_seq_length() == plain.get_seq_length() == len(context) + 6
    for i, (mine, want) in enumerate(zip(cache.layers, plain.layers, strict=True)):
        assert mine.keys.shape == want.keys.shape, f"layer {i}"
        assert_close(mine.keys, want.keys, 1e-5)
        assert_close(mine.values, want.values, 1e-5)
        assert getattr(mine, "cumulative_length", None) == getattr(want, "cumulative_length", None)


@pytest.mark.parametrize("name", ["llama-sdpa", "gemma3-w4-eager", "qwen2-mixed-w5-sdpa"])
@pytest.mark.parametrize("past_len", [2, 3, 30])
def test_keeping_no_rows_gives_back_the_past(name, past_len):
    model = model_named(name)
    cache = prefill(model, list(range(10, 10 + past_len)))
    before = [
        (layer.keys.clone(), layer.values.clone(), getattr(layer, "cumulative_length", None)) for layer in cache.layers
    ]
    tree_forward(model, cache, 3, DraftTree([4, 5, 6, 7, 8], [-1, 0, 1, -1, 3]))
    keep_rows(cache, past_len, [])
    assert cache.get_seq_length() == past_len
    for layer, (keys, values, cumulative) in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        assert getattr(layer, "cumulative_length", None) == cumulative


@pytest.mark.parametrize("rows", [[0], [0, 1], [0, 4], [0, 1, 2, 3]])
def test_keep_rows_prefix_and_branch_paths_continue_like_plain_decoding(rows):
    """A chain prefix (a plain crop) and a branch (an in-place move) both leave a cache that continues correctly."""
    model = model_named("gemma3-w4-eager")
    context = list(range(20, 32))
    tree = DraftTree([50, 51, 52, 60], [-1, 0, 1, -1])
    cache = prefill(model, context)
    tree_forward(model, cache, 44, tree)
    keep_rows(cache, len(context), rows)
    committed = context + [44] + [tree.tokens[r - 1] for r in rows[1:]]
    follow = DraftTree([70, 71, 72, 73, 74], [-1, 0, 1, 2, 3])  # deeper than the window
    assert_close(tree_forward(model, cache, 45, follow), expected_rows(model, committed, 45, follow))


def test_a_mask_without_the_window_fails_the_equivalence_check():
    """The check above can fail: Gemma 3's sliding layers given the full-attention mask score differently."""
    model = model_named("gemma3-w4-eager")
    context = list(range(30, 50))
    tree = DraftTree([1, 2, 3, 4, 5, 6], [-1, 0, 1, 2, -1, 4])
    sees = ancestor_matrix(tree.parents)
    depth = torch.tensor([0, *tree.depths()])
    full = additive_mask(sees, depth, len(context), None, model.dtype)
    right = additive_mask(sees, depth, 3, 4, model.dtype)  # the sliding layer hands over window - 1 past rows
    position_ids = (len(context) + depth)[None]
    ids = torch.tensor([[9, *tree.tokens]])
    want = expected_rows(model, context, 9, tree)
    for mask_for_sliding, ok in [(right, True), (full[..., -(3 + 7) :], False)]:  # the wrong one: shape fits, no window
        trial = prefill(model, context)
        masks = {"full_attention": full, "sliding_attention": mask_for_sliding}
        with torch.no_grad():
            out = model(input_ids=ids, position_ids=position_ids, attention_mask=masks, cache=trial, use_cache=True)
        err = (out.logits[0].float() - want).abs().max().item()
        assert (err <= ATOL) == ok, err


def test_a_flat_causal_mask_fails_the_equivalence_check_on_a_branching_tree():
    """Siblings must not see each other: the plain causal mask over the flat order is wrong for a tree."""
    model = model_named("llama-eager")
    context = list(range(5, 17))
    tree = DraftTree([1, 2, 3], [-1, -1, -1])
    cache = prefill(model, context)
    n = len(tree) + 1
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = additive_mask(causal, torch.arange(n), len(context), None, model.dtype)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([[9, *tree.tokens]]),
            position_ids=(len(context) + torch.tensor([0, 1, 1, 1]))[None],
            attention_mask=mask,
            cache=cache,
            use_cache=True,
        )
    err = (out.logits[0].float() - expected_rows(model, context, 9, tree)).abs().max().item()
    assert err > 1e-3


@pytest.mark.parametrize("name", ["gemma3-w4-eager", "mistral-w6-eager"])
def test_sliding_layers_holding_more_than_their_window_are_read_as_transformers_reads_them(name):
    """A recording sliding layer keeps every row until a crop; a chain forward with all tokens accepted leaves
    it so (the decode loop crops nothing then). The tree's mask must cover only the rows the layer hands over."""
    model = model_named(name)
    context = list(range(30, 45))
    cache = prefill(model, context[:5])
    with torch.no_grad():
        model(input_ids=torch.tensor([context[5:]]), cache=cache, use_cache=True)  # 10 rows kept past the window
    tree = DraftTree([1, 2, 3, 4, 5], [-1, 0, 1, 2, 0])
    assert_close(tree_forward(model, cache, 6, tree), expected_rows(model, context, 6, tree))


def test_gemma3_with_a_cache_built_without_its_config_applies_the_window_on_full_layers():
    """DynamicCache() keeps every row in every layer; the window then lives in the mask alone."""
    model = model_named("gemma3-w4-eager")
    context = list(range(40, 58))
    tree = DraftTree([1, 2, 3, 4, 5], [-1, 0, 1, 2, 0])
    cache = prefill(model, context, config=False)
    assert_close(tree_forward(model, cache, 6, tree), expected_rows(model, context, 6, tree))
    keep_rows(cache, len(context), accepted_rows(tree, 3))
    follow = DraftTree([7, 8], [-1, 0])
    assert_close(tree_forward(model, cache, 9, follow), expected_rows(model, context + [6, 1, 2, 3, 4], 9, follow))


@pytest.mark.parametrize("name", ["llama-eager", "gemma3-w4-eager"])
def test_an_empty_tree_is_the_pending_token_alone(name):
    model = model_named(name)
    context = list(range(3, 12))
    cache = prefill(model, context)
    got = tree_forward(model, cache, 7, DraftTree([], []))
    assert got.shape == (1, VOCAB)
    assert_close(got[0], plain_logits(model, context + [7])[-1])
    keep_rows(cache, len(context), [0])
    assert cache.get_seq_length() == len(context) + 1


def test_an_inference_mode_forward_can_be_compacted_outside_it():
    model = model_named("llama-sdpa")
    context = list(range(8))
    tree = DraftTree([1, 2, 3], [-1, -1, 1])
    with torch.inference_mode():
        cache = prefill(model, context)
        tree_forward(model, cache, 4, tree)
    keep_rows(cache, len(context), [0, 2, 3])
    assert cache.get_seq_length() == len(context) + 3


def test_ancestor_matrix_marks_self_and_ancestors_only():
    sees = ancestor_matrix([-1, -1, 0, 2, 1])  # rows: pending, 0, 1, 2 (under 0), 3 (under 2), 4 (under 1)
    want = {0: {0}, 1: {0, 1}, 2: {0, 2}, 3: {0, 1, 3}, 4: {0, 1, 3, 4}, 5: {0, 2, 5}}
    assert {r: set(sees[r].nonzero().flatten().tolist()) for r in range(6)} == want


def test_supported_models_and_a_clear_error_for_the_rest():
    assert all(supports_tree(model_named(name)) for name in MODELS)
    model = build_model("llama", None)
    model.config._attn_implementation = "flash_attention_2"  # takes no custom mask
    assert not supports_tree(model)
    with pytest.raises(ValueError, match="'llama'.*flash_attention_2"):
        tree_forward(model, DynamicCache(config=model.config), 1, DraftTree([2], [-1]))


def test_sliding_layers_must_record_their_past():
    model = model_named("gemma3-w4-eager")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([list(range(12))]), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="activate_past_recording"):
        tree_forward(model, cache, 1, DraftTree([2], [-1]))


def test_keep_rows_rejects_rows_the_forward_did_not_make():
    model = model_named("llama-sdpa")
    cache = prefill(model, [1, 2, 3])
    tree_forward(model, cache, 4, DraftTree([5, 6], [-1, -1]))
    with pytest.raises(ValueError, match="rows"):
        keep_rows(cache, 3, [0, 3])


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_ten_node_tree_rows_match_plain_decoding(smollm2):
    model, tokenizer = smollm2
    word = {w: tokenizer.encode(" " + w)[0] for w in ("fox", "jumps", "over", "runs", "dog", "cat")}
    tree = DraftTree(  # fox jumps over {dog, cat}; fox runs over; dog jumps; cat
        [word[w] for w in ("fox", "jumps", "over", "runs", "dog", "cat", "dog", "cat", "jumps", "over")],
        [-1, 0, 1, 0, -1, -1, 2, 2, 4, 3],
    )
    context = tokenizer.encode("The quick brown fox jumps over the lazy dog. The quick brown")
    cache = prefill(model, context[:-1])
    got = tree_forward(model, cache, context[-1], tree)
    # logits of size ~20 from forwards of other widths: 5e-5 apart here (sdpa and eager), room left for other BLAS
    assert_close(got, expected_rows(model, context[:-1], context[-1], tree), 3e-4)

"""Benchmark workloads: fixed, seeded samples of requests built from the fetched data.

`load_workload(name, n=..., seed=...)` returns `Request`s. A request is either a chat (`messages`, rendered with
the model's chat template by whoever runs it) or a raw completion `prompt`; `references` carries documents that a
reference store may hold but the prompt does not contain.

Sampling is plain: the candidates of a workload are shuffled by `random.Random(seed)` and taken in that order,
skipping those that fail a size filter (prompt over `max_prompt_tokens`, code files outside 150-900 tokens). Any
per-request choice (how many lines, which distractor passages) uses a generator seeded by (seed, candidate id), so
a request does not change with `n`, and `n=5` is a prefix of `n=10`. Nothing here is tuned to make any decoding
method look fast.

Token counts come from `tokenizer` when one is given, otherwise from an estimate of 4 characters per token.

This module knows prompt formats and sampling. It does not fetch or parse raw data (`refdecode.bench.data`) and
it does not run models.
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from refdecode.bench import data

__all__ = ["Request", "WORKLOADS", "load_workload", "count_tokens", "request_tokens", "chunk_rest"]

WORKLOADS = ("code-edit", "code-edit-ref", "rag", "rag-index", "summarize", "chat", "control", "spec-bench")

CHARS_PER_TOKEN = 4  # estimate used when no tokenizer is given
CODE_MIN_TOKENS, CODE_MAX_TOKENS = 150, 900
MAX_DIFF_LINES = 40  # longer diffs are described, not quoted
PREFIX_LINES = (15, 25)  # code-edit-ref: lines of the new file given as the prompt
PASSAGE_WORDS = (150, 300)  # rag: words per passage
DISTRACTORS = (1, 3)  # rag: distractor passages besides the one holding the answer
CHITCHAT_MIN_TURNS = 3  # control: chit-chat dialogs shorter than this are skipped
CHITCHAT_MAX_TURNS = 7  # control: history kept from a chit-chat dialog (ends on a user turn)


@dataclass(frozen=True)
class Request:
    """One benchmark request; exactly one of `messages` (chat=True) and `prompt` (chat=False) is set."""

    id: str
    workload: str
    messages: list[dict] | None  # [{"role": "user"|"assistant", "content": str}] when chat
    prompt: str | None  # raw completion prompt when not chat
    chat: bool
    references: tuple[tuple[str, str], ...] = ()  # (source name, text): extra documents NOT in the prompt
    category: str = ""  # Spec-Bench category, else ""


# ---------------------------------------------------------------------------------------------------------------
# token counting


def count_tokens(text: str, tokenizer=None) -> int:
    """Tokens of `text` without special tokens; an estimate (4 chars per token) when tokenizer is None."""
    if tokenizer is None:
        return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_chat(messages: Sequence[dict], tokenizer) -> str:
    """The chat prompt as the model sees it (template + generation prompt); plain role lines without tokenizer."""
    if tokenizer is None:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def request_tokens(request: Request, tokenizer=None) -> int:
    """Prompt length in tokens: chat template applied for chat requests, special tokens added for raw prompts."""
    if request.messages is not None:
        return count_tokens(render_chat(request.messages, tokenizer), tokenizer)
    prompt = request.prompt or ""
    if tokenizer is None:
        return count_tokens(prompt)
    return len(tokenizer(prompt)["input_ids"])


def truncate_to_tokens(text: str, max_tokens: int, tokenizer=None) -> str:
    """`text` cut to at most `max_tokens` tokens, backing off to a paragraph (else sentence) end."""
    if max_tokens <= 0:
        return ""
    if count_tokens(text, tokenizer) <= max_tokens:
        return text
    if tokenizer is None:
        cut = text[: max_tokens * CHARS_PER_TOKEN]
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cut = tokenizer.decode(ids[:max_tokens])
    # prefer a paragraph end in the last quarter, else a sentence end in the last half
    for boundary, keep in (("\n\n", 0.75), (". ", 0.5)):
        end = cut.rfind(boundary)
        if end >= keep * len(cut):
            return cut[: end + (1 if boundary == ". " else 0)].rstrip()
    return cut.rstrip()


# ---------------------------------------------------------------------------------------------------------------
# sampling


def request_rng(seed: int, key: str) -> random.Random:
    """A generator for one candidate's choices, independent of which other candidates were drawn."""
    return random.Random(f"{seed}:{key}")


def sample(
    candidates: Sequence,
    n: int,
    rng: random.Random,
    build: Callable[[object], Request | None],
    fits: Callable[[Request], bool],
) -> list[Request]:
    """Shuffle candidates with rng, build them in that order, keep the first n that build and fit.

    Returns fewer than n when the candidates run out.
    """
    order = list(range(len(candidates)))
    rng.shuffle(order)
    out: list = []
    for i in order:
        if len(out) == n:
            break
        request = build(candidates[i])
        if request is not None and fits(request):
            out.append(request)
    return out


def interleave(groups: list[list[Request]]) -> list[Request]:
    """Round-robin over groups, so that any prefix of the result keeps the mix."""
    out, k = [], 0
    while any(k < len(g) for g in groups):
        out += [g[k] for g in groups if k < len(g)]
        k += 1
    return out


# ---------------------------------------------------------------------------------------------------------------
# code edits


def unified_diff(old: str, new: str, path: str) -> str:
    """The unified diff (3 lines of context) that turns `old` into `new`."""
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), fromfile=f"a/{path}", tofile=f"b/{path}"
        )
    )


def code_size_ok(pair: dict, tokenizer) -> bool:
    return CODE_MIN_TOKENS <= count_tokens(pair["old"], tokenizer) <= CODE_MAX_TOKENS


def edit_instruction(pair: dict) -> str:
    """One line asking for the new release, plus the diff when it is short."""
    line = f"Update it to {pair['package']} {pair['new_version']}"
    diff = unified_diff(pair["old"], pair["new"], pair["path"])
    changed = sum(1 for d in diff.splitlines()[2:] if d[:1] in "+-")
    if len(diff.splitlines()) <= MAX_DIFF_LINES:
        return f"{line} by applying this change:\n\n```diff\n{diff.rstrip()}\n```\n\n"
    return f"{line}; the update changes {changed} lines.\n\n"


def build_code_edit(pair: dict, tokenizer) -> Request | None:
    """Chat: the old file in the prompt, asking for the whole updated file."""
    if not code_size_ok(pair, tokenizer):
        return None
    content = (
        f"Here is `{pair['path']}` from {pair['package']} {pair['old_version']}:\n\n"
        f"```python\n{pair['old'].rstrip()}\n```\n\n"
        f"{edit_instruction(pair)}Reply with the full updated file in one ```python block."
    )
    return Request(
        id=f"code-edit/{pair['id']}",
        workload="code-edit",
        messages=[{"role": "user", "content": content}],
        prompt=None,
        chat=True,
    )


def build_code_edit_ref(pair: dict, tokenizer, seed: int) -> Request | None:
    """Completion: the first 15-25 lines of the new file; the old file only as a reference document."""
    if not code_size_ok(pair, tokenizer):
        return None
    k = request_rng(seed, pair["id"]).randint(*PREFIX_LINES)
    lines = pair["new"].splitlines(keepends=True)
    if len(lines) < k + 10:  # leave something to write
        return None
    source = f"{pair['package']}-{pair['old_version']}/{pair['path']}"
    return Request(
        id=f"code-edit-ref/{pair['id']}",
        workload="code-edit-ref",
        messages=None,
        prompt="".join(lines[:k]),
        chat=False,
        references=((source, pair["old"]),),
    )


# ---------------------------------------------------------------------------------------------------------------
# retrieval-augmented QA over the Python docs


def split_long(paragraph: str, max_words: int) -> list[str]:
    """A paragraph over max_words split at line ends (words, for a single huge line)."""
    pieces: list[str] = []
    cur: list[str] = []
    count = 0
    for line in paragraph.splitlines():
        words = len(line.split())
        if cur and count + words > max_words:
            pieces.append("\n".join(cur))
            cur, count = [], 0
        cur.append(line)
        count += words
    if cur:
        pieces.append("\n".join(cur))
    out: list[str] = []
    for piece in pieces:
        piece_words = piece.split()
        if len(piece_words) <= max_words:
            out.append(piece)
        else:
            out += [" ".join(piece_words[i : i + max_words]) for i in range(0, len(piece_words), max_words)]
    return out


def chunk_rest(text: str, min_words: int = PASSAGE_WORDS[0], max_words: int = PASSAGE_WORDS[1]) -> list[str]:
    """reST text -> passages of whole paragraphs, each min_words..max_words words (the last may be shorter).

    Paragraphs are blank-line separated blocks; one longer than max_words is split at line ends.
    """
    if not 0 < min_words <= max_words:
        raise ValueError(f"need 0 < min_words <= max_words, got {min_words}, {max_words}")
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    pieces = [q for p in paragraphs for q in split_long(p, max_words)]
    chunks: list[str] = []
    cur: list[str] = []
    count = 0
    for piece in pieces:
        words = len(piece.split())
        if cur and count + words > max_words:
            chunks.append("\n\n".join(cur))
            cur, count = [], 0
        cur.append(piece)
        count += words
        if count >= min_words:
            chunks.append("\n\n".join(cur))
            cur, count = [], 0
    if cur:
        if chunks and len(chunks[-1].split()) + count <= max_words:
            chunks[-1] += "\n\n" + "\n\n".join(cur)
        else:
            chunks.append("\n\n".join(cur))
    return chunks


def distractor_passages(rng: random.Random, files: list, exclude: str, k: int) -> list[str]:
    """k passages of at least half the minimum size, each from a random docs file other than `exclude`."""
    out: list[str] = []
    tries = 0
    while len(out) < k and tries < 20 * k:
        tries += 1
        path = rng.choice(files)
        if path.as_posix().endswith(exclude):
            continue
        try:
            text = data.read_text(path)
        except RuntimeError:  # not UTF-8: skip the file
            continue
        chunks = [c for c in chunk_rest(text) if len(c.split()) >= PASSAGE_WORDS[0] // 2 and c not in out]
        if chunks:
            out.append(rng.choice(chunks))
    return out


def build_rag(faq: dict, files: list, seed: int) -> Request | None:
    """Chat: the passage holding the FAQ answer, then 1-3 distractor passages, then the question."""
    rng = request_rng(seed, faq["id"])
    answer = chunk_rest(faq["answer"])
    if not answer:
        return None
    passages = [answer[0]] + distractor_passages(rng, files, faq["file"], rng.randint(*DISTRACTORS))
    body = "\n\n".join(f"Passage {i}:\n{p}" for i, p in enumerate(passages, 1))
    content = f"{body}\n\nQuestion: {faq['question']}\nAnswer using the passages."
    return Request(
        id=f"rag/{faq['id']}", workload="rag", messages=[{"role": "user", "content": content}], prompt=None, chat=True
    )


# ---------------------------------------------------------------------------------------------------------------
# summarization, chat, controls, Spec-Bench

SUMMARIZE_INSTRUCTION = "Summarize this paper in an abstract."


def drop_dangling_heading(text: str) -> str:
    """Without a last paragraph that is only a section name (a cut can end right after one)."""
    head, _, last = text.rpartition("\n\n")
    if head and len(last.split()) <= 8 and not last.rstrip().endswith((".", ":", "?", "!")):
        return head.rstrip()
    return text


def build_summarize(pair: dict, tokenizer, max_prompt_tokens: int) -> Request:
    """Chat: the paper, cut to the token budget, followed by the instruction."""

    def message(paper: str) -> list[dict]:
        return [{"role": "user", "content": f"{paper}\n\n{SUMMARIZE_INSTRUCTION}"}]

    overhead = count_tokens(render_chat(message(""), tokenizer), tokenizer)
    budget = max_prompt_tokens - overhead - 4  # tokens can merge differently at the seam
    paper = truncate_to_tokens(pair["paper"], budget, tokenizer)
    if paper != pair["paper"]:
        paper = drop_dangling_heading(paper)
    return Request(id=f"summarize/{pair['id']}", workload="summarize", messages=message(paper), prompt=None, chat=True)


def longest_fitting_history(turns: list[dict], fits: Callable[[list[dict]], bool]) -> list[dict] | None:
    """The longest prefix of a conversation that ends on a user turn and fits, or None."""
    ends = [i for i, t in enumerate(turns) if t["role"] == "user" and t["content"].strip()]
    for end in reversed(ends):
        if fits(turns[: end + 1]):
            return turns[: end + 1]
    return None


def as_turns(dialog: list[str]) -> list[dict]:
    """Alternating speakers -> user/assistant messages, the first speaker being the user."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(dialog)]


def spec_bench_category(category: str) -> str:
    """The Spec-Bench leaderboard's six categories: the 8 MT-bench topics count as "mt_bench"."""
    return "mt_bench" if category in data.MT_BENCH_TOPICS else category


# ---------------------------------------------------------------------------------------------------------------
# the entry point


def check_args(name: str, n: int, seed: int, max_prompt_tokens: int) -> None:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 64:
        raise ValueError(f"max_prompt_tokens must be an int >= 64, got {max_prompt_tokens!r}")


@dataclass(frozen=True)
class Sampling:
    """What every workload builder needs: how many, the shuffling generator, and the size budget."""

    n: int
    seed: int
    rng: random.Random
    tokenizer: object
    max_prompt_tokens: int
    index: object = None  # a refdecode.corpus.CorpusIndex, for rag-index

    def fits(self, request: Request) -> bool:
        return request_tokens(request, self.tokenizer) <= self.max_prompt_tokens

    def history_fits(self, turns: list[dict]) -> bool:
        text = render_chat(turns, self.tokenizer)
        if len(text) > 12 * self.max_prompt_tokens:  # cheap reject before tokenizing long histories
            return False
        return count_tokens(text, self.tokenizer) <= self.max_prompt_tokens

    def take(self, candidates: Sequence, build: Callable, n: int | None = None) -> list[Request]:
        return sample(candidates, self.n if n is None else n, self.rng, build, self.fits)


def code_edit_workload(s: Sampling) -> list[Request]:
    return s.take(data.code_edit_pairs(), lambda p: build_code_edit(p, s.tokenizer))


def code_edit_ref_workload(s: Sampling) -> list[Request]:
    return s.take(data.code_edit_pairs(), lambda p: build_code_edit_ref(p, s.tokenizer, s.seed))


def rag_workload(s: Sampling) -> list[Request]:
    files = data.python_docs_files()
    return s.take(data.faq_pairs(), lambda f: build_rag(f, files, s.seed))


def build_rag_index(faq: dict, index, k: int = 3) -> Request:
    """Chat: the index's top-k passages for the FAQ question, then the question (retrieval-augmented for real)."""
    passages = [p.text.strip() for p in index.retrieve(faq["question"], k=k)]
    body = "\n\n".join(f"Passage {i}:\n{p}" for i, p in enumerate(passages, 1))
    content = f"{body}\n\nQuestion: {faq['question']}\nAnswer using the passages."
    return Request(
        id=f"rag-index/{faq['id']}",
        workload="rag-index",
        messages=[{"role": "user", "content": content}],
        prompt=None,
        chat=True,
    )


def rag_index_workload(s: Sampling) -> list[Request]:
    if s.index is None:
        raise ValueError("the rag-index workload needs a corpus index (bench --index DIR)")
    return s.take(data.faq_pairs(), lambda f: build_rag_index(f, s.index))


def summarize_workload(s: Sampling) -> list[Request]:
    return s.take(data.aclsum_pairs(), lambda p: build_summarize(p, s.tokenizer, s.max_prompt_tokens))


def chat_workload(s: Sampling) -> list[Request]:
    """ShareGPT: the longest history ending on a user turn that fits the budget, from the benchmark half of the
    conversations only (`data.sharegpt_split`: the other half trains Medusa heads)."""
    convs, _ = data.sharegpt_split(data.sharegpt_conversations())

    def build(i: int) -> Request | None:
        history = longest_fitting_history(convs[i], s.history_fits)
        if history is None:
            return None
        return Request(id=f"chat/sharegpt-{i}", workload="chat", messages=history, prompt=None, chat=True)

    return s.take(range(len(convs)), build)


def control_workload(s: Sampling) -> list[Request]:
    """Little to copy: chit-chat dialogs (first turns, chat) and HumanEval prompts (completion), interleaved."""
    dialogs = data.chitchat_dialogs()

    def build_chitchat(i: int) -> Request | None:
        if len(dialogs[i]) < CHITCHAT_MIN_TURNS:  # 44% of the dialogs are a lone greeting
            return None
        history = longest_fitting_history(as_turns(dialogs[i][:CHITCHAT_MAX_TURNS]), s.history_fits)
        if history is None:
            return None
        return Request(id=f"control/chitchat-{i}", workload="control", messages=history, prompt=None, chat=True)

    def build_humaneval(p: dict) -> Request:
        return Request(id=f"control/{p['task_id']}", workload="control", messages=None, prompt=p["prompt"], chat=False)

    chats = s.take(range(len(dialogs)), build_chitchat, s.n - s.n // 2)
    codes = s.take(data.humaneval_problems(), build_humaneval, s.n // 2)
    return interleave([chats, codes])


def spec_bench_workload(s: Sampling) -> list[Request]:
    """First turns of Spec-Bench questions, n split evenly over the six categories (file order), interleaved."""
    questions = data.spec_bench_questions()
    categories = list(dict.fromkeys(spec_bench_category(q["category"]) for q in questions))
    groups = []
    for k, category in enumerate(categories):
        quota = s.n // len(categories) + (1 if k < s.n % len(categories) else 0)
        pool = [q for q in questions if spec_bench_category(q["category"]) == category]

        def build(q: dict, category: str = category) -> Request:
            return Request(
                id=f"spec-bench/{q['question_id']}",
                workload="spec-bench",
                messages=[{"role": "user", "content": q["turns"][0]}],
                prompt=None,
                chat=True,
                category=category,
            )

        groups.append(s.take(pool, build, quota))
    return interleave(groups)


BUILDERS: dict[str, Callable[[Sampling], list[Request]]] = {
    "code-edit": code_edit_workload,
    "code-edit-ref": code_edit_ref_workload,
    "rag": rag_workload,
    "rag-index": rag_index_workload,
    "summarize": summarize_workload,
    "chat": chat_workload,
    "control": control_workload,
    "spec-bench": spec_bench_workload,
}


def load_workload(
    name: str, *, n: int, seed: int = 0, tokenizer=None, max_prompt_tokens: int = 1400, index=None
) -> list[Request]:
    """n requests of workload `name` (one of WORKLOADS), the same for the same (seed, data, tokenizer).

    Requests whose prompt (chat template applied) exceeds max_prompt_tokens are skipped; fewer than n come back
    only when the data runs out. Workloads:
      code-edit      chat: old file in the prompt + "update it to NEW" (+ the diff when short); whole file out
      code-edit-ref  completion: first 15-25 lines of the new file; old file in `references` only
      rag            chat: FAQ-answer passage + 1-3 Python-docs distractor passages + FAQ question
      rag-index      chat: the top 3 passages a corpus index (index=) retrieves for a FAQ question + the question
      summarize      chat: ACL paper cut to the budget + "Summarize this paper in an abstract."
      chat           ShareGPT: longest history ending on a user turn that fits
      control        half chit-chat dialogs (chat), half HumanEval prompts (completion), interleaved
      spec-bench     first turn of Spec-Bench questions, stratified over the six categories
    """
    check_args(name, n, seed, max_prompt_tokens)
    sampling = Sampling(
        n=n, seed=seed, rng=random.Random(seed), tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens, index=index
    )
    return BUILDERS[name](sampling)

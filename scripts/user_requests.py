"""Hand-written requests of the kinds users bring, none of them the benchmark's own: a held-out check.

The benchmark samples its prompts from fixed datasets with fixed templates (refdecode.bench.workloads), and every
policy change is measured on them. These requests are worded the way a user would write them, on sources the
benchmark never samples: modules of Python's own standard library (present wherever Python is) and pages of the
Python documentation outside the FAQ (the benchmark's RAG source). Two requests per kind: a code edit with the old
file only as a reference, a code edit with the code in the prompt, a RAG answer from passages, a summary of a long
text, and a chat that revisits an earlier turn.

    python -m scripts.user_requests --model qwen2.5-coder-1.5b --out user-requests.json
    python -m scripts.bench --model qwen2.5-coder-1.5b --dtype bfloat16 --requests user-requests.json \
        --max-new-tokens 64 --methods greedy pld refdecode --draft-model qwen2.5-coder-0.5b --share-prefill

The documentation pages come from the data cache (`make data`); the rendered file holds token ids only and runs
wherever the model does.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

from refdecode.bench import data
from refdecode.bench.runner import PreparedRequest, export_requests, render_prompt
from refdecode.bench.workloads import Request, chunk_rest

# Each code request names a standard-library module and, for an edit in the prompt, the function it quotes.
CODE_EDIT_REF = (
    (
        "colorsys.py",
        "In colorsys.py, rename rgb_to_hls and hls_to_rgb to rgb_to_hsl and hsl_to_rgb (same arguments, same "
        "results) and update the module docstring to match. Reply with the complete updated module in one ```python "
        "block.",
    ),
    (
        "bisect.py",
        "Add type hints to every function in bisect.py: `a` is a list, `x` can be anything, `lo` and `hi` are ints "
        "and `key` is an optional callable. Do not change anything else. Give me the whole file back in a ```python "
        "block.",
    ),
)
CODE_EDIT = (
    (
        "textwrap.py",
        "dedent",
        "This function is hard to read. Keep its behaviour exactly, but rename the local variables "
        "`_whitespace_only_re` and `_leading_whitespace_re` uses to clearer names and add a short comment above each "
        "step. Show the full function.",
    ),
    (
        "shlex.py",
        "quote",
        "Please add a docstring example (a doctest) to this function showing how a filename with a space is quoted, "
        "and otherwise leave it as it is. Reply with the updated function.",
    ),
)
# (page, a word the answer's passages hold, a page for a distractor passage, question)
RAG = (
    (
        "library/functools.rst.txt",
        "typed",
        "library/pathlib.rst.txt",
        "What does the typed argument of lru_cache do, and how do I clear a cache it made?",
    ),
    (
        "library/pathlib.rst.txt",
        "with_suffix",
        "library/functools.rst.txt",
        "How do I get the suffix of a file name with pathlib, and how do I change it?",
    ),
)
SUMMARIZE = (
    (
        "whatsnew/3.11.rst.txt",
        "Summarize these release notes for my team in one short paragraph, naming the changes "
        "that matter most for everyday code.",
    ),
    (
        "tutorial/classes.rst.txt",
        "Summarize the part of this tutorial about scopes and namespaces in a few sentences for a beginner.",
    ),
)
CHAT = (
    [
        {"role": "user", "content": "I have a list of dicts like {'name': 'Ann', 'age': 31}. How do I sort it by age?"},
        {
            "role": "assistant",
            "content": "Use `sorted` with a key function:\n\n```python\npeople = [\n    {'name': "
            "'Ann', 'age': 31},\n    {'name': 'Bob', 'age': 25},\n    {'name': 'Cid', 'age': 31},\n]\n\nby_age = "
            "sorted(people, key=lambda person: person['age'])\nfor person in by_age:\n    print(person['name'], "
            "person['age'])\n```\n\n`sorted` returns a new list; `people.sort(key=...)` sorts the list in place.",
        },
        {
            "role": "user",
            "content": "Now sort by age descending, and by name ascending when the ages are equal. Show "
            "the whole example again.",
        },
    ],
    [
        {"role": "user", "content": "Write a short email to my landlord saying the heating in my flat is broken."},
        {
            "role": "assistant",
            "content": "Subject: Heating not working\n\nDear Mr. Miller,\n\nI am writing to let you "
            "know that the heating in my flat has stopped working. The radiators stay cold even when the thermostat is "
            "turned up. Could you please arrange for someone to look at it as soon as possible?\n\nThank you for your "
            "help.\n\nBest regards,\nAnna",
        },
        {
            "role": "user",
            "content": "Keep the email but mention that it has been broken since Monday and that I am at "
            "home every afternoon.",
        },
    ],
)
PASSAGES_PER_PAGE = 2
SUMMARY_CHARS = 6000


def stdlib_source(name: str) -> str:
    path = Path(sysconfig.get_paths()["stdlib"]) / name
    return path.read_text(encoding="utf-8")


def function_source(module_text: str, name: str) -> str:
    """The top-level `def name` of a module's text, up to the next top-level statement."""
    lines = module_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"def {name}("))
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return "\n".join(lines[start:end]).rstrip()


def doc_page(docs: Path, name: str) -> str:
    return (docs / name).read_text(encoding="utf-8")


def asked(kind: str, name: str, content: str, references=()) -> Request:
    """One chat request of `kind`, a single user turn."""
    return Request(
        id=f"{kind}/user/{name}",
        workload=kind,
        messages=[{"role": "user", "content": content}],
        prompt=None,
        chat=True,
        references=tuple(references),
    )


def build(docs: Path) -> list[Request]:
    requests = []
    for module, ask in CODE_EDIT_REF:
        requests.append(asked("code-edit-ref", module, ask, ((module, stdlib_source(module)),)))
    for module, function, ask in CODE_EDIT:
        code = function_source(stdlib_source(module), function)
        requests.append(asked("code-edit", f"{module}:{function}", f"```python\n{code}\n```\n\n{ask}"))
    for page, word, other, question in RAG:
        relevant = [p for p in chunk_rest(doc_page(docs, page)) if word in p][:PASSAGES_PER_PAGE]
        passages = relevant + chunk_rest(doc_page(docs, other))[:1]
        body = "\n\n".join(f"[{i + 1}] {p}" for i, p in enumerate(passages))
        requests.append(asked("rag", page, f"Passages:\n\n{body}\n\n{question}"))
    for page, ask in SUMMARIZE:
        text = doc_page(docs, page)[:SUMMARY_CHARS]
        requests.append(asked("summarize", page, f"{text}\n\n{ask}"))
    for i, messages in enumerate(CHAT):
        requests.append(Request(id=f"chat/user/{i}", workload="chat", messages=messages, prompt=None, chat=True))
    return requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.user_requests", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b", help="whose tokenizer renders the requests")
    parser.add_argument("--out", required=True, help="the requests file to write (for scripts.bench --requests)")
    args = parser.parse_args(argv)
    try:
        docs = data.python_docs_dir()
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import refdecode

    tokenizer = refdecode.load_tokenizer(args.model)
    prepared = []
    for request in build(docs):
        refs = [(src, tokenizer.encode(text, add_special_tokens=False)) for src, text in request.references]
        prepared.append(PreparedRequest(request.id, request.workload, render_prompt(request, tokenizer), refs))
    export_requests(args.out, prepared, tokenizer=tokenizer, meta={"model": args.model, "source": "user_requests"})
    print(f"wrote {len(prepared)} requests to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

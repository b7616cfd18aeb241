"""RULER's synthetic retrieval tasks (Hsieh et al., 2024; github.com/NVIDIA/RULER), reimplemented offline.

Four tasks, in RULER's prompt formats (`scripts/data/synthetic/constants.py`, base model template: the task template
followed by its answer prefix, which the model continues) and scoring (`string_match_all`: the fraction of the
expected strings found, case-insensitively, in the prediction; a task's score is the mean, in percent):

- `niah_single`     RULER's `niah_single_1`: one needle "One of the special magic numbers for {key} is: {value}."
                    (adjective-noun key, 7-digit value) in the repeated "The grass is green..." noise.
- `niah_multikey`   RULER's `niah_multikey_1`: four needles with different keys in an essay haystack; one is asked.
- `niah_multivalue` RULER's `niah_multivalue`: four values for the same key in an essay haystack; all are asked.
- `vt`              RULER's variable tracking: a chain "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE ", ... (4 hops)
                    hidden in the noise, after one solved example (RULER's few-shot example: 500 tokens, or a
                    quarter of the length for lengths under 2k);
                    the answer is every variable of the chain.

Lengths are counted by the model's tokenizer, as in RULER: `length` = prompt tokens + the generation budget, and the
haystack is sized (binary search over its units) to the largest that fits the target. Differences from RULER, none
of which changes a prompt's format: RULER's essay haystack is Paul Graham's essays (downloaded); here any local text
serves (by default the held-out corpus, never training text), split into sentences by a regular expression instead
of NLTK's punkt model (which would need a download). Keys come from a small built-in adjective and noun list instead
of the `wonderwords` package. Needle depths can be fixed (for depth sweeps); by default they are drawn as RULER
draws them (40 evenly spaced depths for essays, uniform sentence positions for noise). Generation budgets default to
what the answers need (RULER generates 128 tokens for needles, 30 for variable tracking); `max_new_tokens` overrides.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .metrics import PASSKEY_FILLER as NOISE  # the noise haystack is the passkey test's filler

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
    "the value {query}, they are: "
)
# RULER's 40 candidate depths (percent) for essay haystacks.
RULER_DEPTHS = [round(100 * i / 39) for i in range(40)]

ADJECTIVES = (
    "abundant acidic agreeable ancient angry bitter brave breezy bright broad calm careful cheerful chilly clever "
    "cloudy clumsy curious damp dazzling eager early elegant empty fancy fierce fluffy fragile friendly gentle giant "
    "glossy graceful grumpy handsome happy hollow humble icy jolly juicy kind lively lonely loud lucky magnificent "
    "massive mellow misty modern narrow nervous noisy odd orange patient plain polite proud quaint quick quiet rapid "
    "rare rough round rusty salty scarce shallow shiny silent silky sleepy slim smooth sour spicy steady sticky "
    "stormy sturdy sweet swift tame tender thirsty tidy tiny tough vast violet warm wealthy wide wild wise witty "
    "wooden young zealous"
).split()
NOUNS = (
    "acorn anchor apple archer badge bakery balloon banjo barrel basket beacon bicycle blanket blossom bottle bridge "
    "bucket butter cabin camera candle canyon carpet castle cattle cellar chair cherry chimney circus cloak clock "
    "cobbler comet compass cottage crayon cricket crystal cupboard dagger desert diamond dolphin donkey dragon drum "
    "eagle engine feather fiddle forest fountain garden glacier goblet guitar hammer harbor helmet honey island "
    "jacket jungle kettle kitten ladder lantern lemon meadow mirror monkey mountain needle ocean orchard otter "
    "paddle parrot pebble pencil pepper piano pillow planet pocket puzzle rabbit raven ribbon river rocket saddle "
    "sailor scarf shadow shovel spider sponge squirrel statue teapot thunder tiger tower tractor trumpet tunnel "
    "umbrella valley violin wagon walnut whistle window wizard"
).split()


@dataclass(frozen=True)
class RulerTask:
    """One RULER task configuration (`scripts/synthetic.yaml`)."""

    kind: str  # "niah" or "vt"
    haystack: str = "noise"  # "noise", "essay" or "needle"
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1
    num_chains: int = 1
    num_hops: int = 4
    ruler_tokens_to_generate: int = 128  # RULER's budget
    default_new_tokens: int = 24  # ours: enough for the answers


TASKS = {
    "niah_single": RulerTask("niah", "noise", default_new_tokens=24),
    "niah_multikey": RulerTask("niah", "essay", num_needle_k=4, default_new_tokens=24),
    "niah_multivalue": RulerTask("niah", "essay", num_needle_v=4, default_new_tokens=64),
    "vt": RulerTask("vt", "noise", ruler_tokens_to_generate=30, default_new_tokens=30),
}


def random_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_value(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def split_sentences(text: str) -> list[str]:
    """Sentences of a whitespace-normalised text (a regular-expression stand-in for NLTK's `sent_tokenize`)."""
    text = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])", text) if s]


class _Sample:
    """The random draws of one sample; `prompt(units)` builds its prompt with `units` haystack units (noise
    sentences, essay words or distractor needles), so the haystack size can be searched without new draws."""

    def __init__(self, task: RulerTask, rng: random.Random, essay_words: list[str] | None, depths):
        self.task, self.essay_words = task, essay_words
        self.depths = depths
        if task.kind == "niah":
            k = max(task.num_needle_k, task.num_needle_q)
            keys = []
            while len(keys) < k:  # distinct keys
                key = random_key(rng)
                if key not in keys:
                    keys.append(key)
            self.values = [[random_value(rng) for _ in range(task.num_needle_v)] for _ in keys]
            self.needles = [
                NEEDLE.format(type_needle_v="numbers", key=key, value=v)
                for key, vs in zip(keys, self.values)
                for v in vs
            ]
            rng.shuffle(self.needles)
            asked = rng.sample(range(k), task.num_needle_q)
            queries = [keys[i] for i in asked]
            self.answers = [v for i in asked for v in self.values[i]]
            self.query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
            self.keys = keys
        else:
            names = _distinct_names(rng, task.num_chains * (task.num_hops + 1), 5)
            self.chains = []
            for c in range(task.num_chains):
                chain_vars = names[c * (task.num_hops + 1) : (c + 1) * (task.num_hops + 1)]
                chain = [f"VAR {chain_vars[0]} = {rng.randint(10000, 99998)}"]
                chain += [f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]} " for j in range(task.num_hops)]
                self.chains.append((chain_vars, chain))
            self.answers = list(self.chains[0][0])
            self.query = self.chains[0][1][0].split("=")[-1].strip()
            self.example = None
        self.draw_state = rng.getstate()  # positions are drawn from here, identically for every haystack size

    def context(self, units: int) -> str:
        """The haystack of `units` units with the needles (or chains) inserted."""
        rng = random.Random()
        rng.setstate(self.draw_state)
        task = self.task
        inserts = self.needles if task.kind == "niah" else None
        if task.haystack == "essay":
            words = self.essay_words
            if not words:
                raise ValueError("The essay haystack needs text (essay_text=)")
            text = " ".join((words * (units // len(words) + 1))[:units])
            sentences = split_sentences(text)
            if task.kind == "vt":
                inserts = _interleave_chains([c for _, c in self.chains], rng)
                inserts = [s.strip() + "." for s in inserts]
            depths = (
                self.depths if self.depths is not None else [d / 100 for d in rng.sample(RULER_DEPTHS, len(inserts))]
            )
            cuts = [0, *sorted(int(len(sentences) * d) for d in depths), len(sentences)]
            pieces = []
            for i in range(1, len(cuts)):
                pieces.append(" ".join(sentences[cuts[i - 1] : cuts[i]]))
                if i - 1 < len(inserts):
                    pieces.append(inserts[i - 1])
            context = " ".join(pieces)
        else:
            if task.haystack == "noise":
                lines = [NOISE] * units
            elif task.haystack == "needle":
                lines = [
                    NEEDLE.format(type_needle_v="numbers", key=random_key(rng), value=random_value(rng))
                    for _ in range(units)
                ]
            else:
                raise ValueError(f"Unknown haystack {task.haystack!r}")
            if task.kind == "niah":
                if self.depths is not None:
                    where = sorted((round(d * units) for d in self.depths), reverse=True)
                else:
                    where = sorted(rng.sample(range(max(units, len(inserts))), len(inserts)), reverse=True)
                for index, needle in zip(where, inserts):
                    lines.insert(index, needle)
            else:
                for c, (_, chain) in enumerate(self.chains):
                    if self.depths is not None:  # the chain spread evenly from the requested depth on
                        first = round(self.depths[c] * len(lines))
                        room = len(lines) - first
                        where = [first + (room * j) // len(chain) for j in range(len(chain))]
                    else:
                        where = sorted(rng.sample(range(max(len(lines), len(chain))), len(chain)))
                    for j, (index, line) in enumerate(zip(where, chain)):
                        lines.insert(index + j, line)
            context = "\n".join(lines)
        if task.kind == "vt":
            context = context.replace(". \n", ".\n")
        return context

    def prompt(self, units: int) -> str:
        task = self.task
        context = self.context(units)
        if task.kind == "niah":
            template = NIAH_TEMPLATE + NIAH_ANSWER_PREFIX
            type_needle_v = "numbers"
            if task.num_needle_q * task.num_needle_v == 1:  # RULER's singular wording
                for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                    template = template.replace(old, new)
                type_needle_v = "number"
            return template.format(type_needle_v=type_needle_v, context=context, query=self.query)
        text = (VT_TEMPLATE + VT_ANSWER_PREFIX).format(context=context, query=self.query, num_v=task.num_hops + 1)
        return self.example + "\n" + text if self.example else text  # RULER adds a newline after the example


def _distinct_names(rng: random.Random, count: int, letters: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    return names


def _interleave_chains(chains: list[list[str]], rng: random.Random) -> list[str]:
    """All chains' lines in one random interleaving that keeps each chain's order (RULER's heap shuffle)."""
    cursors = [0] * len(chains)
    out = []
    while any(c < len(chain) for c, chain in zip(cursors, chains)):
        live = [i for i, chain in enumerate(chains) if cursors[i] < len(chain)]
        i = rng.choice(live)
        out.append(chains[i][cursors[i]])
        cursors[i] += 1
    return out


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fit(sample: _Sample, tokenizer, budget: int) -> tuple[int, int]:
    """Largest number of haystack units whose prompt has at most `budget` tokens (binary search, as RULER does).
    Returns (units, prompt tokens); at least one unit."""
    lo, hi, best = 1, 2, None
    while _count(tokenizer, sample.prompt(hi)) <= budget:  # grow an upper bound
        lo, hi = hi, hi * 2
    while lo <= hi:
        mid = (lo + hi) // 2
        n = _count(tokenizer, sample.prompt(mid))
        if n <= budget:
            best, lo = (mid, n), mid + 1
        else:
            hi = mid - 1
    if best is None:
        best = (1, _count(tokenizer, sample.prompt(1)))
    return best


def vt_example(tokenizer, rng: random.Random, task: RulerTask, example_tokens: int = 500) -> str:
    """RULER's solved variable-tracking example: a 3-letter chain with value 12345 in at most `example_tokens`
    tokens of noise, its answer appended; names and value are redrawn per use (`randomize`)."""
    icl = _Sample(task, rng, None, None)
    names = _distinct_names(rng, task.num_hops + 1, 3)
    chain = ["VAR " + names[0] + " = 12345"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(task.num_hops)]
    icl.chains, icl.answers, icl.query = [(names, chain)], names, "12345"
    units, _ = _fit(icl, tokenizer, example_tokens)
    return icl.prompt(units) + " " + " ".join(names) + "\n"


def example_budget(length: int) -> int:
    """Tokens of the solved variable-tracking example: RULER's 500, or a quarter of the sample's length when that is
    less (RULER's shortest length is 4k tokens; ours go down to a few hundred)."""
    return min(500, length // 4)


def randomize_example(example: str, rng: random.Random, num_hops: int) -> str:
    """New names for the example's chain variables and a new value, as RULER's `randomize_icl`."""
    for name in example.strip().split()[-(num_hops + 1) :]:
        example = example.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
    return example.replace("12345", str(rng.randint(10000, 99998)))


def generate_sample(
    task_name: str,
    tokenizer,
    length: int,
    seed: int = 0,
    depths: list[float] | None = None,
    essay_text: str | None = None,
    max_new_tokens: int | None = None,
    example: str | None = None,
) -> dict:
    """One RULER sample of about `length` tokens (prompt + generation budget, by `tokenizer`). `depths` (fractions in
    [0, 1], one per needle, or per chain for `vt`) fix where the needles go; None draws them as RULER does.
    Returns `input` (the prompt, answer prefix included), `outputs` (the expected strings), `length`,
    `prompt_tokens`, `max_new_tokens` and, for needles, `needle_positions` (character offsets of the needles)."""
    task = TASKS[task_name]
    rng = random.Random(f"{task_name}-{length}-{seed}")
    new_tokens = max_new_tokens or task.default_new_tokens
    words = essay_text.split() if essay_text else None
    if depths is not None:
        need = 1 if task.kind == "vt" else max(task.num_needle_k, task.num_needle_q) * task.num_needle_v
        if len(depths) != need:
            raise ValueError(f"{task_name} needs {need} depths, got {len(depths)}")
        if any(not 0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"depths are fractions in [0, 1], got {depths}")
    sample = _Sample(task, rng, words, depths)
    if task.kind == "vt":
        if example is None:
            example = vt_example(tokenizer, random.Random(f"vt-example-{seed}"), task, example_budget(length))
        sample.example = randomize_example(example, rng, task.num_hops)
    units, prompt_tokens = _fit(sample, tokenizer, length - new_tokens)
    text = sample.prompt(units)
    out = {
        "task": task_name,
        "input": text,
        "outputs": list(sample.answers),
        "length": prompt_tokens + new_tokens,
        "target_length": length,
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": new_tokens,
        "haystack_units": units,
    }
    if task.kind == "niah":
        out["needle_positions"] = sorted(text.find(n) for n in sample.needles)
        out["needles"] = list(sample.needles)
    return out


def postprocess(prediction: str) -> str:
    """RULER's `postprocess_pred`: control characters become newlines, surrounding space goes."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(predictions: list[str], references: list[list[str]]) -> float:
    """RULER's metric for needles and variable tracking: per prediction, the fraction of its references found in it
    (case-insensitive); the mean over predictions, in percent, rounded to 2 decimals."""
    if not predictions:
        return 0.0
    per = [sum(r.lower() in p.lower() for r in refs) / len(refs) for p, refs in zip(predictions, references)]
    return round(100 * sum(per) / len(predictions), 2)


def string_match_part(predictions: list[str], references: list[list[str]]) -> float:
    """RULER's metric for QA: 1 when any reference is found in the prediction; mean in percent."""
    if not predictions:
        return 0.0
    per = [max(r.lower() in p.lower() for r in refs) for p, refs in zip(predictions, references)]
    return round(100 * sum(per) / len(predictions), 2)


@torch.no_grad()
def ruler_eval(
    model,
    tokenizer,
    tasks: list[str],
    lengths: list[int],
    samples: int = 2,
    seed: int = 0,
    essay_text: str | None = None,
    max_new_tokens: int | None = None,
    progress: bool = False,
    desc: str = "ruler",
) -> dict:
    """Greedy generation on `samples` prompts per task and length; RULER's score (percent) per task and length,
    and the predictions."""
    device = next(model.parameters()).device
    jobs = [(t, n, s) for t in tasks for n in lengths for s in range(samples)]
    scores: dict[str, dict[str, float]] = {t: {} for t in tasks}
    records = []
    examples = {}
    preds: dict[tuple[str, int], list] = {}
    for task_name, length, s in tqdm(jobs, desc=desc, leave=False, disable=not progress):
        task = TASKS[task_name]
        if task.kind == "vt" and (s, length) not in examples:
            rng = random.Random(f"vt-example-{seed + s}")
            examples[s, length] = vt_example(tokenizer, rng, task, example_budget(length))
        sample = generate_sample(
            task_name, tokenizer, length, seed + s, None, essay_text, max_new_tokens, examples.get((s, length))
        )
        ids = tokenizer(sample["input"], return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=sample["max_new_tokens"],
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
        prediction = postprocess(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        preds.setdefault((task_name, length), []).append((prediction, sample["outputs"]))
        records.append(
            {
                "task": task_name,
                "length": sample["length"],
                "target_length": length,
                "outputs": sample["outputs"],
                "prediction": prediction,
                "score": string_match_all([prediction], [sample["outputs"]]),
            }
        )
    for (task_name, length), pairs in preds.items():
        scores[task_name][str(length)] = string_match_all([p for p, _ in pairs], [r for _, r in pairs])
    return {"scores": scores, "samples": records}

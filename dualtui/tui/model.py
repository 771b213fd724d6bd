"""What the app shows, computed with the same engine calls as the CLI (no Textual here)."""

from __future__ import annotations

from ..literal import literal

from dataclasses import dataclass
from typing import Callable

import numpy as np
from rich.text import Text

from ..bundle.reader import Bundle
from ..engine.curve import DEFAULT_POINTS
from ..engine.spotlight import GROUPS, SCORES, Ranked, Spotlight, item_pattern_scores, spotlights
from ..engine.stream import gather_rows
from ..engine.text import is_text, labels_are_tokens, position_span
from ..tokens import visible

# Rows of the ranking the app asks the engine for (both ends, every score and grouping).
TOP = 100


@dataclass
class TestItem:
    index: int
    label: int
    prediction: int
    task: int

    @property
    def correct(self) -> bool:
        return self.label == self.prediction


@dataclass
class LayerScore:
    """A selected training pattern (or example) seen from one layer."""

    layer: str
    attention: float
    magnitude: float
    effect: float
    exact_pattern: bool  # True: the same pattern (step, example) exists here; else example sums


class OpenRun:
    """A bundle opened for browsing, with the lookups the views need."""

    def __init__(self, bundle: Bundle, queries: str | None = None):
        self.bundle = bundle
        m = bundle.manifest
        self.layers = m.layer_names
        self.tasks = m.tasks
        self.classes = m.classes
        self.query_set_names = bundle.query_set_names
        self.use_queries(queries)
        self.train_label = bundle.array("train/label")
        self.train_task = bundle.array("train/task")
        self.is_text = is_text(bundle)
        v = m.input.get("vocab")
        self._vocab: list[str] | None = [str(t) for t in v] if isinstance(v, list) else None
        self.labels_are_tokens = labels_are_tokens(bundle)
        self.context = position_span(bundle) if self.is_text else 0
        # Grouping per training token needs positions at every layer (text runs).
        with_positions = self.is_text and all(bundle.has_position(L) for L in self.layers)
        self.groups: tuple[str, ...] = GROUPS if with_positions else tuple(g for g in GROUPS if g != "position")

    def use_queries(self, name: str | None) -> None:
        """Browse the query set `name` (default: test): its items replace the test items."""
        self.queries = self.bundle.queries(name)
        self.queries_name = self.queries.name
        self.test_label = self.queries.label
        self.test_prediction = self.queries.prediction
        self.test_task = self.queries.task
        # The predicted class's probability and the loss per item (record_test stores them; older
        # bundles and other writers may not): what the Tests tab sorts by.
        self.test_probability = self.queries.array("probability") if self.queries.has("probability") else None
        self.test_loss = self.queries.array("loss") if self.queries.has("loss") else None

    # ----------------------------------------------------------------- names
    def class_name(self, i: int) -> str:
        name = self.classes[i] if 0 <= i < len(self.classes) else str(i)
        return visible(name, alone=True) if self.is_text else literal(name)

    def task_name(self, i: int) -> str:
        return literal(self.tasks[i]) if 0 <= i < len(self.tasks) else str(i)

    @property
    def test_size(self) -> int:
        return len(self.test_label)

    def test_item(self, m: int) -> TestItem:
        return TestItem(m, int(self.test_label[m]), int(self.test_prediction[m]), int(self.test_task[m]))

    SORTS = {"index": "by index", "confidence-low": "least confident first", "confidence-high": "most confident first",
             "loss-high": "highest loss first"}

    def sorts(self) -> list[str]:
        """The orders this query set supports (confidence and loss only where they are stored)."""
        return ["index"] + (["confidence-low", "confidence-high"] if self.test_probability is not None else []) + (
            ["loss-high"] if self.test_loss is not None else [])

    def test_items(self, task: int | None = None, correct: bool | None = None, label: int | None = None,
                   prediction: int | None = None, sort: str = "index") -> np.ndarray:
        """Indices of test items passing the filters, in the order `sort` (ties by index)."""
        keep = np.ones(self.test_size, dtype=bool)
        if task is not None:
            keep &= self.test_task == task
        if correct is not None:
            keep &= (self.test_label == self.test_prediction) == correct
        if label is not None:
            keep &= self.test_label == label
        if prediction is not None:
            keep &= self.test_prediction == prediction
        idx = np.nonzero(keep)[0]
        key = {"confidence-low": self.test_probability, "loss-high": None if self.test_loss is None else -self.test_loss,
               "confidence-high": None if self.test_probability is None else -self.test_probability}.get(sort)
        if key is not None:
            idx = idx[np.lexsort((idx, key[idx]))]
        return idx

    # ----------------------------------------------------------------- previews
    @property
    def input_kind(self) -> str:
        return str(self.bundle.manifest.input.get("kind", "vector"))

    def test_input(self, m: int) -> np.ndarray | None:
        return self.queries.input(m)

    def train_input(self, e: int) -> np.ndarray | None:
        return self.bundle.array("train/input", e, e + 1)[0] if self.bundle.has("train/input") else None

    def test_preview(self, m: int) -> tuple[np.ndarray | None, dict]:
        """A test item's preview and how to mark it: in text runs, the context with the query
        position highlighted and the prediction after it (green when right, red when wrong)."""
        data = self.test_input(m)
        if not self.is_text or data is None:
            return data, {}
        it = self.test_item(m)
        tokens = data.reshape(-1)[: self.context]
        pred = self.classes[it.prediction] if 0 <= it.prediction < len(self.classes) else "?"
        return tokens, {"highlight": len(tokens) - 1, "suffix": (pred, "bold green" if it.correct else "bold red")}

    def train_preview(self, row: Ranked) -> tuple[np.ndarray | None, dict]:
        """A ranked row's training example; in text runs the attended position is highlighted
        and the token it was trained to predict marked (when the row has a position)."""
        data = self.train_input(row.example)
        if not self.is_text or data is None:
            return data, {"highlight": row.position}
        tokens = data.reshape(-1)
        if row.position is None:
            return tokens[: self.context], {}
        return tokens, {"highlight": row.position, "target": row.position + 1 if row.position + 1 < len(tokens) else None}

    def snippet(self, row: Ranked, width: int) -> Text:
        """One line of training text for a ranked row: the attended token reversed and the token
        it was trained to predict after "▸" (the whole window's start for an example)."""
        from .render import text_window

        data, _ = self.train_preview(row)
        tokens = self.tokens(data)
        if row.position is None:
            return text_window(tokens[:width], None, width=width)
        nxt = tokens[row.position + 1] if row.position + 1 < len(tokens) else None
        return text_window(tokens[: row.position + 1], row.position, next_token=nxt, width=width)

    def test_snippet(self, m: int, width: int) -> Text:
        """The end of a test item's context, the query position highlighted (text runs)."""
        from .render import text_window

        data, marks = self.test_preview(m)
        return text_window(self.tokens(data), marks.get("highlight"), width=width)

    def vocab(self) -> list[str] | None:
        return self._vocab

    def tokens(self, ids: np.ndarray | None) -> list[str]:
        """Token ids as strings ("?" for an id outside the vocabulary)."""
        vocab = self._vocab or []
        if ids is None:
            return []
        return [vocab[i] if 0 <= i < len(vocab) else "?" for i in np.asarray(ids).reshape(-1).tolist()]

    # ----------------------------------------------------------------- training time
    def total_steps(self) -> int:
        from ..engine.spotlight import total_steps

        return total_steps(self.bundle, self.layers[0])

    def task_boundaries(self) -> list[tuple[int, str]]:
        """(step, task name) where each training phase starts, when the manifest says."""
        phases = self.bundle.manifest.training.get("task_phases")
        out = []
        if isinstance(phases, list):
            for k, ph in enumerate(phases):
                if isinstance(ph, (list, tuple)) and len(ph) == 2:
                    out.append((int(ph[0]), self.task_name(k)))
        return out

    # ----------------------------------------------------------------- spotlights
    def compute(self, test: int, layer: str, cancel: Callable[[], bool] | None = None) -> Spotlight:
        """Everything the app shows for one test item at one layer: one engine pass."""
        return spotlights(self.bundle, layer, [test], top=TOP, by=SCORES, groups=self.groups, reverse=(False, True),
                          summary=True, masses=True, dense_examples=True, cancel=cancel, queries=self.queries_name,
                          curve=DEFAULT_POINTS)[0]

    def group_curves(self, test: int, layer: str, by: str):
        """The sorted top-500 scores per (task, class) of one item at one layer (`dualtui curves`)."""
        from ..engine.group_curves import group_curves

        return group_curves(self.bundle, layer, test, by=by if by in ("attention", "magnitude", "effect") else "attention",
                            top=500, queries=self.queries_name)

    def across_layers(self, test: int, row: Ranked, group: str, results: dict[str, Spotlight]) -> list[LayerScore]:
        """The selected pattern's (or example's) scores at every computed layer."""
        out = []
        q_cache: dict[str, object] = {}

        def scores(layer: str, idx: np.ndarray) -> dict[str, np.ndarray]:
            if layer not in q_cache:
                q_cache[layer] = self.queries.rows(layer, [test])
            return item_pattern_scores(self.bundle, layer, idx, q_cache[layer], 0)

        for layer in self.layers:
            spot = results.get(layer)
            if spot is None:
                continue
            if group == "pattern" and row.pattern is not None and row.pattern < self.bundle.layer_spec(layer).patterns:
                idx = np.array([row.pattern])
                same = (int(gather_rows(self.bundle, layer, "step", idx)[0]) == row.step
                        and int(gather_rows(self.bundle, layer, "example", idx)[0]) == row.example)
                if same:  # layers recorded in the same forward passes share pattern indices
                    sc = scores(layer, idx)
                    out.append(LayerScore(layer, float(sc["attention"][0]), float(sc["magnitude"][0]), float(sc["effect"][0]), True))
                    continue
            if group == "position" and row.position is not None:
                idx = self.token_patterns(layer, row.example, row.position)
                sc = scores(layer, idx) if len(idx) else {k: np.zeros(0) for k in SCORES}
                out.append(LayerScore(layer, float(sc["attention"].sum()), float(sc["magnitude"].sum()), float(sc["effect"].sum()), True))
                continue
            if spot.example_scores is not None:
                e = row.example
                out.append(LayerScore(layer, float(spot.example_scores["attention"][e]), float(spot.example_scores["magnitude"][e]),
                                      float(spot.example_scores["effect"][e]), False))
        return out

    def token_patterns(self, layer: str, example: int, position: int) -> np.ndarray:
        """Indices of the patterns of one training token (example, position) at `layer`."""
        found, offset = [], 0
        for ex_name, pos_name in zip(self.bundle.pattern_names(layer, "example"), self.bundle.pattern_names(layer, "position")):
            ex, pos = self.bundle.raw(ex_name), self.bundle.raw(pos_name)
            found.append(np.nonzero((ex == example) & (pos == position))[0] + offset)
            offset += len(ex)
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

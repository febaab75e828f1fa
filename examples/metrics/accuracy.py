"""Accuracy as an `evaluate` module that loads from this file, offline (the Hub's "accuracy" needs the network)."""

import datasets
import evaluate


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="The fraction of predictions equal to their reference.",
            citation="",
            inputs_description="predictions and references: class indices",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": float(sum(int(p == r) for p, r in zip(predictions, references)) / max(len(references), 1))}

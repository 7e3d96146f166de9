"""Improved precision and recall (k-NN manifolds, Kynkäänniemi et al. 2019), as an `evaluate` module.

    pr = evaluate.load("path/to/htd_toolkit/evaluate/hub_metrics/precision_recall")
    pr.compute(predictions=synthetic_features, references=real_features, k=3)   # {"precision", "recall"}
"""

import datasets
import evaluate
import numpy as np

from htd_toolkit.evaluate.precision_recall import precision_recall

_CITATION = """@inproceedings{kynkaanniemi2019improved, title={Improved precision and recall metric for assessing
generative models}, author={Kynk{\\"a}{\\"a}nniemi, Tuomas and others}, booktitle={NeurIPS}, year={2019}}"""


class PrecisionRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of synthetic points inside the real k-NN manifold (precision) and of real points "
                        "inside the synthetic one (recall).",
            citation=_CITATION,
            inputs_description="predictions: synthetic feature vectors; references: real feature vectors; k.",
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Sequence(datasets.Value("float64"))}))

    def _compute(self, predictions, references, k: int = 3):
        precision, recall = precision_recall(np.asarray(references), np.asarray(predictions), k)
        return {"precision": precision, "recall": recall}

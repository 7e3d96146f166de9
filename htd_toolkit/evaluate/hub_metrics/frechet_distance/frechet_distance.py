"""Fréchet distance between two sets of feature vectors, as an `evaluate` module.

    import evaluate
    fd = evaluate.load("path/to/htd_toolkit/evaluate/hub_metrics/frechet_distance")
    fd.compute(predictions=synthetic_features, references=real_features)   # {"frechet_distance": float}

Features come from any encoder (`htd_toolkit.clustering.encoders.get_encoder`); `evaluate` pairs
predictions with references, so give both sets the same number of vectors.
"""

import datasets
import evaluate
import numpy as np

from htd_toolkit.evaluate.fd import frechet_distance

_CITATION = """@inproceedings{heusel2017gans, title={GANs trained by a two time-scale update rule converge to a local
Nash equilibrium}, author={Heusel, Martin and others}, booktitle={NeurIPS}, year={2017}}"""


class FrechetDistance(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fréchet distance between Gaussians fitted to two feature sets (float64, PSD square root).",
            citation=_CITATION,
            inputs_description="predictions: synthetic feature vectors; references: real feature vectors.",
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Sequence(datasets.Value("float64"))}))

    def _compute(self, predictions, references):
        return {"frechet_distance": frechet_distance(np.asarray(references), np.asarray(predictions))}

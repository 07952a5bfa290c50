"""Top-1 accuracy as an `evaluate` module that loads offline by path
(``evaluate.load("accuracy")`` needs the Hub):

    metric = evaluate.load("metrics/accuracy")
    metric.compute(predictions=logits.argmax(-1), references=labels)
"""

import datasets
import evaluate
import numpy

_DESCRIPTION = """
Top-1 accuracy: the fraction of predicted class indices equal to the reference class indices.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class indices (the argmax of the logits).
    references: true class indices.
Returns:
    accuracy: in [0, 1]; num_examples.
Example:
    >>> metric = evaluate.load("metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 2, 3])["accuracy"]
    0.75
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = numpy.asarray(predictions), numpy.asarray(references)
        return {"accuracy": float((predictions == references).mean()), "num_examples": int(predictions.shape[0])}

from .zeroshot import build_classifier, classification_metrics, evaluate_zeroshot, run_zeroshot

__all__ = ["build_classifier", "classification_metrics", "evaluate_zeroshot", "run_zeroshot"]

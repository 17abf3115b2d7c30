"""Making runs: training (local or distributed), tracking, evaluation and reports, the demo, legacy import."""

"""Analysis: corpus statistics, training memory estimates, training-log reading, and the markdown + plot reports of
Baichuan-Analysis.

May import: every stage below serving (base, data, models, generation, retrieval, evaluation, training)."""

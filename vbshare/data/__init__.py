"""Datasets: BBC News (embedded default), the task builders the training app uses, and padded batches.

    from vbshare.data import batches, bbc_news
    for batch in batches(bbc_news(max_length=64), tokenizer, steps=30):   # dicts for model(**batch)
        ...
"""
from .batching import batches, collate
from .tasks import Encoded, Split, Task, bbc_lm, bbc_news, files, tokenize_task

__all__ = ["Encoded", "Split", "Task", "batches", "bbc_lm", "bbc_news", "collate", "files", "tokenize_task"]

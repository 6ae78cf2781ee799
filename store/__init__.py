"""store: the run store, a folder that any number of workers on any number of machines fill at once.

One module per job: settings.py (the settings that bind a store), files.py (atomic publishing and who
owns a file), claims.py (runs in progress), runs.py (finished and failed run files and their checks),
pack.py (the packed arrays the analysis reads), margins.py (each run's margins, kept beside the pack),
layout.py (opening and creating a store). Which examples a run may see is design.py's. numpy only: viz.py
reads a store without torch.
The layout of a store and every guarantee, with the test that checks it: docs/store.md.
"""
from design import (ARMS, DESIGNS, FACTORIAL_ARMS, MAX_RUNS, SCAN_SEED_BASE, factorial_split, held_out_indices,
                    keep_for, kept_bits, kept_mask, seed_for)
from store.claims import CLAIM_NAME, CLAIM_REFRESH
from store.files import (CLAIM_TIMEOUT, READER_TIMEOUT, StoreError, Unreadable, _start_time, fsync_dir, identity,
                         note, owner_alive, parse_json, publish)
from store.layout import SUBFOLDERS, Store
from store.pack import HEADER_BYTES
from store.runs import FAILED_NAME, RUN_NAME
from store.settings import BINDING, FORMAT, check_settings, digest, labels_digest

# The design's names stay importable from here for code written against the single-module store.
__all__ = ['ARMS', 'DESIGNS', 'FACTORIAL_ARMS', 'MAX_RUNS', 'SCAN_SEED_BASE', 'factorial_split', 'held_out_indices',
           'keep_for', 'kept_bits', 'kept_mask', 'seed_for', 'CLAIM_NAME', 'CLAIM_REFRESH', 'CLAIM_TIMEOUT',
           'READER_TIMEOUT', 'StoreError', 'Unreadable', '_start_time', 'fsync_dir', 'identity', 'note', 'owner_alive',
           'parse_json', 'publish', 'SUBFOLDERS', 'Store', 'HEADER_BYTES', 'FAILED_NAME', 'RUN_NAME', 'BINDING',
           'FORMAT', 'check_settings', 'digest', 'labels_digest']

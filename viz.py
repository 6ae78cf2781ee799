"""viz.py: the self-influence reports of a run store (python viz.py --help).

Self-influence of example i: mean margin over the runs that trained on it - mean margin over the runs
that did not (margin: the correct class's logit minus logsumexp of the other nine). The store's arms pick
the report: `with`/`without` the with/without report (this file), `a`/`b` the factorial report
(viz_factorial.py), `scan` the scan's (viz_scan.py, with --scan).

    python viz.py                          # runs/airbench: the answer, the original's table, the details
    python viz.py --trainer madry          # runs/madry
    python viz.py runs/whatever --test z   # the original's normal p-value
    python viz.py --all --csv si.csv --json si.json --plot si.png
    python viz.py --controls 0             # no controls: the raw shift, said so in the answer
    python viz.py runs/digits-factorial    # a factorial store
    python viz.py --scan                   # runs/airbench-scan: every example's self-influence
    python viz.py --seed-folders nets10_default nets10_minus_n40   # the original scripts' .pt files

Controls: for each held-out example, --controls K (default 50) training examples never held out, with
its label and the nearest mean margin over both arms; their shift, read at the example's own mean margin
from the line through its controls (viz_controls.py), is what the removal does to an example like it, and
the control-adjusted self-influence is shift - control shift. Runs with a non-finite logit at a held-out
example are left out and named. Notes go to stderr, the report to stdout. What each report estimates:
docs/analysis.md and docs/controls.md; its cost: docs/speed.md.
"""
import argparse
import os
import signal
import sys

import startup

if __name__ == '__main__':  # Ctrl-C during the imports below (scipy: most of a second) is one line too
    startup.ctrl_c_is_one_line('viz')

import viz_controls  # noqa: E402
import viz_factorial  # noqa: E402
import viz_scan  # noqa: E402
import viz_with_without  # noqa: E402
from store import Store, StoreError  # noqa: E402
from viz_io import remove_stale_temps, write_csv, write_json, write_plot  # noqa: E402


PLOT_EXTENSIONS = ('.png', '.pdf', '.svg', '.eps', '.ps', '.jpg', '.jpeg', '.tif', '.tiff', '.webp')  # matplotlib writes these


class Parser(argparse.ArgumentParser):
    """A mistake in the options is one line on stderr and exit 2; the usage block only with --help."""

    def error(self, message):
        sys.stderr.write(f'viz: {message} (options: python viz.py --help)\n')
        sys.exit(2)


HELP = "Self-influence reports of a run store, the answer first (method: docs/analysis.md; notes on stderr)."

EXAMPLES = """examples:
  python viz.py runs/airbench --csv si.csv --json si.json --plot si.png
  python viz.py --seed-folders nets10_default nets10_minus_n40   # the original scripts' .pt files"""


def make_parser():
    parser = Parser(usage='python viz.py [STORE] [options]', description=HELP, epilog=EXAMPLES,
                    formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=100))
    parser.add_argument('store', nargs='?', help='store folder (default runs/<trainer>, or runs/<trainer>-scan)')
    parser.add_argument('--trainer', default='airbench', help='reads runs/<trainer> when no store is given')
    parser.add_argument('--test', choices=('welch', 'z'), default='welch', help="Welch's t-test or the original's z-test")
    parser.add_argument('--alpha', type=float, default=0.01, metavar='P', help='significance threshold (with --scan: of BH p)')
    parser.add_argument('--all', action='store_true', help='also list every held-out example with its CI')
    parser.add_argument('--csv', metavar='FILE', help='write per-example statistics as CSV')
    parser.add_argument('--json', metavar='FILE', help='write them with the headline and group summaries as JSON')
    parser.add_argument('--plot', metavar='FILE.png', help='write a forest plot (.png .pdf .svg ...)')
    parser.add_argument('--controls', type=int, metavar='K',
                        help=f'controls per held-out example (default {viz_controls.CONTROLS}; 0: raw shift)')
    parser.add_argument('--scan', action='store_true', help="report a scan store: every example's self-influence")
    parser.add_argument('--top', type=int, metavar='N', help='examples listed with --scan (10), or cross-influences (10)')
    parser.add_argument('--seed-folders', nargs=2, metavar=('WITH', 'WITHOUT'),
                        help="the original scripts' folders of <uuid>.pt logits instead of a store")
    parser.add_argument('--data-dir', metavar='DIR', help='with --seed-folders: where CIFAR-10 is (its labels; default data)')
    return parser


def check_flags(parser, args):
    """Flags out of range or outside the scan report: argparse's usage error (exit 2). Fills in --controls."""
    if not 0 < args.alpha < 1:
        parser.error(f'--alpha {args.alpha}: expected a probability between 0 and 1, e.g. 0.01')
    if args.scan and (args.all or args.plot or args.test != 'welch' or args.controls is not None):
        parser.error('--all, --plot, --controls and --test z belong to the with/without and factorial reports; '
                     'with --scan use --top, --alpha, --csv and --json')
    if args.plot and not args.plot.lower().endswith(PLOT_EXTENSIONS):
        parser.error(f'--plot {args.plot}: unknown image extension; expected one of {" ".join(PLOT_EXTENSIONS)}, '
                     'e.g. --plot si.png')
    if args.controls is not None and args.controls < 0:
        parser.error(f'--controls {args.controls}: expected a number of controls per example, 0 or more')
    if args.controls is None:
        args.controls = viz_controls.CONTROLS
    if args.seed_folders and (args.store or args.scan):
        parser.error('--seed-folders WITH WITHOUT replaces the store folder and --scan; pass one or the other')
    if args.data_dir is not None and not args.seed_folders:
        parser.error('--data-dir goes with --seed-folders (a store holds its own labels)')
    if args.top is not None and args.top < 1:
        parser.error(f'--top {args.top}: expected a number of examples, 1 or more')


def report(parser, args, store):
    """The report the store's arms call for (--scan: the scan's), refusing the flags that do not belong to
    it. -> (its module, its result, its printed lines)."""
    if args.scan:
        res = viz_scan.analyse(store, args.alpha, args.top or viz_scan.TOP)
        return viz_scan, res, viz_scan.lines(res, args.top or viz_scan.LISTED)
    if viz_factorial.is_factorial(store):
        if args.test != 'welch':
            parser.error('--test z belongs to the with/without report; the factorial report uses paired t-tests')
        res = viz_factorial.analyse(store, args.alpha, args.controls)
        return viz_factorial, res, viz_factorial.lines(res, args.top or viz_factorial.TOP, args.all)
    if args.top is not None:
        parser.error('--top belongs to the scan (--scan) and factorial reports; the with/without report '
                     'lists every held-out example (--all)')
    res = viz_with_without.analyse(store, args.test, args.alpha, args.controls)
    return viz_with_without, res, viz_with_without.lines(res, args.all)


def seed_report(parser, args):
    """--seed-folders: the original's two folders of .pt logits, imported into a temporary store (unpaired
    runs) and reported like a store, named by its folders."""
    import shutil
    import tempfile

    import seed_import
    for folder in args.seed_folders:  # the folders first: a mistyped one is the likelier mistake
        seed_import.check_folder(folder)
    labels = seed_import.cifar10_labels(args.data_dir or 'data')
    tmp = tempfile.mkdtemp(prefix='viz-seed-')
    try:
        store = seed_import.import_folders(*args.seed_folders, os.path.join(tmp, 'store'), labels)
        module, res, _ = report(parser, args, store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res['path'] = ' + '.join(args.seed_folders)
    return module, res, module.lines(res, args.all)


def _stop(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so a report file's temporary name is removed


def main(argv=None):
    """The command line; Ctrl-C or SIGTERM ends it with one line (exit 130), removing its temporary files."""
    previous = signal.signal(signal.SIGTERM, _stop)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # from here it unwinds, cleaning up
    try:
        return _main(argv)
    except KeyboardInterrupt:
        sys.stderr.write('\nviz: interrupted; a report file not yet written was left as it was. '
                         'Rerun viz.py for the whole report.\n')
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _main(argv):
    parser = make_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    remove_stale_temps([args.csv, args.json, args.plot])
    path = args.store or (f'runs/{args.trainer}-scan' if args.scan else f'runs/{args.trainer}')
    try:
        if args.seed_folders:
            module, res, lines = seed_report(parser, args)
        else:
            module, res, lines = report(parser, args, Store(path))
    except StoreError as e:
        sys.exit(f'viz: {e}')
    print('\n'.join(lines))
    outputs = ((args.csv, lambda out: write_csv(res, out, module.COLUMNS)),
               (args.json, lambda out: write_json(res, out, module.json_doc(res), module.COLUMNS)),
               (args.plot, lambda out: write_plot(res, out, *module.plot_labels(res))))
    for out, write in outputs:
        if out:
            try:
                write(out)
            except OSError as e:
                sys.exit(f'viz: could not write {out} ({e}); the report above is complete. '
                         'Pass a path in a writable folder.')
    return res


if __name__ == '__main__':
    main()

"""Semi-supervised learning with the M2 model (Kingma et al. 2014), against Pyro's own example.

M2 is a VAE whose label is a latent variable: p(label) p(z) p̂(y|label, z), with the guide
q(label|y) q(z|y, label). Where a training image has a label it is data; where it has none,
`ScaledELBO` sums the label out exactly (`models/m2_mnist.toml`, ``label.latent = true``). The
classifier q(label|y) is part of the encoder. The ELBO alone trains it only through the label's
rate, so Kingma et al. add an encoder-only cross-entropy on the labelled images, their α-term.
That is the lecture's encoder autonomy in its strongest form: a loss on the encoder alone
decides what the classifier learns.

The runs use `models/m2_mnist.toml`: the settings of Pyro's `examples/vae/ss_vae_M2.py` (z 50,
hidden 500, softplus, batch 200, lr 4.2e-4, aux weight 46, 50 epochs) on the 10k MNIST test
images beside the repository, 8000 train / 2000 test. They cover 100 and 1000 labels, with and
without the α-term. Each run reports the test accuracy of q(label|y) (most probable class), the
test ELBO with the label summed out, the label's rate and the training time. ``--dump-split DIR``
writes the exact split and the labelled subset of each label count (`split_<N>.npz`: x_train,
labels_train with −1 where unknown, x_test, labels_test). A peer reads that file to train on the
same data; examples/README.md says how Pyro's example was run that way.

    python examples/semi_supervised.py --backend numpyro     # 4 runs (about 5 minutes on 2 cores)
    python examples/semi_supervised.py --smoke               # seconds, checks it runs

Writes runs/semi_supervised/: a run folder per setting, table.md, results.json,
semi_supervised.png (accuracy per setting, with the peer's where --peer gives its results, and
one row of samples per class with the same z in each column, from the best run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ppl_vae import experiments, runs

NAME = "semi_supervised"
LABELS = (100, 1000)
AUX_WEIGHT = 46.0
STEPS = 2000  # 50 epochs of 8000 images in batches of 200
COLUMNS = [("labels", "labelled", "{}"), ("α-term", "aux_text", "{}"),
           ("test accuracy", "accuracy", "{:.3f}"), ("test −ELBO", "neg_elbo", "{:.2f}"),
           ("rate of the label", "label_rate", "{:.3f}"), ("rate", "rate", "{:.2f}"),
           ("train s", "train_seconds", "{:.0f}"), ("s / epoch", "seconds_per_epoch", "{:.2f}")]


def settings(args) -> list[tuple[int, float]]:
    labels = (20,) if args.smoke else args.labels
    return [(n, w) for n in labels for w in (AUX_WEIGHT, 0.0)]


def main(args) -> dict:
    started = time.perf_counter()
    out = experiments.output_dir(args, NAME)
    rows = []
    for labelled, weight in settings(args):
        aux = (f'objective.aux=[{{kind="supervised", site="label", weight={weight}}}]'
               if weight else "objective.aux=[]")
        overrides = [f'data.path="{args.mnist}"', f"data.labelled={labelled}", aux]
        spec = experiments.make_spec("m2_mnist", overrides, args, STEPS)
        if args.dump_split:
            dump_split(spec, Path(args.dump_split) / f"split_{labelled}.npz")
        folder = out / f"labels{labelled}-{'aux' if weight else 'noaux'}"
        report = experiments.train_and_evaluate(spec, folder, args)
        n_train = runs.load_run(folder).info["n_train"]  # as the run's data loader saw it
        epochs = spec.train.steps * spec.train.batch_size / n_train
        rows.append({"labelled": labelled, "aux_weight": weight,
                     "aux_text": f"× {weight:g}" if weight else "none",
                     "accuracy": report["accuracy"], "neg_elbo": -report["elbo"],
                     "label_rate": report["label_rate"], "rate": report["rate"],
                     "train_seconds": report["train_seconds"],
                     "seconds_per_epoch": report["train_seconds"] / epochs,
                     "folder": str(folder)})
    peer = json.loads(Path(args.peer).read_text()) if args.peer else None
    table = experiments.markdown_table(rows, COLUMNS)
    if peer:
        table += "\n\n" + peer_table(rows, peer)
    best = max(rows, key=lambda r: r["accuracy"])
    plot(rows, peer, best, args, out / "semi_supervised.png")
    experiments.write_results(out, NAME, rows, table, started, args, {"peer": peer})
    return {"rows": rows}


def dump_split(spec, path: Path) -> None:
    """The training and test arrays exactly as this project's run sees them."""
    from ppl_vae.data import load_data
    from ppl_vae.training import evaluation_data

    data = load_data(spec)
    x_test, labels_test = evaluation_data(spec, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x_train=data.x_train, labels_train=data.labels_train,
                        x_test=x_test, labels_test=labels_test)


def peer_table(rows: list[dict], peer: dict) -> str:
    """Side by side with the peer's results: {"<labels>-<aux|noaux>": {"accuracy", "seconds",
    "epochs"}} as written by the peer's run (examples/README.md)."""
    lines = ["| labels | α-term | this project | Pyro's ss_vae_M2.py | s / epoch here | "
             "s / epoch, peer |", "|---|---|---|---|---|---|"]
    for r in rows:
        p = peer.get(f"{r['labelled']}-{'aux' if r['aux_weight'] else 'noaux'}")
        if p is None:
            continue
        lines.append(f"| {r['labelled']} | {r['aux_text']} | {r['accuracy']:.3f} | "
                     f"{p['accuracy']:.3f} | {r['seconds_per_epoch']:.2f} | "
                     f"{p['seconds'] / p['epochs']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], peer, best: dict, args, path) -> None:
    from ppl_vae.plots import figure, save

    fig = figure((12, 4.5))
    ax = fig.add_subplot(1, 2, 1)
    names = [f"{r['labelled']} labels\n{'α-term' if r['aux_weight'] else 'ELBO only'}"
             for r in rows]
    at = np.arange(len(rows))
    ax.bar(at - 0.2, [r["accuracy"] for r in rows], 0.4, label=f"this project ({args.backend})")
    if peer:
        keys = [f"{r['labelled']}-{'aux' if r['aux_weight'] else 'noaux'}" for r in rows]
        ax.bar(at + 0.2, [peer.get(k, {}).get("accuracy", np.nan) for k in keys], 0.4,
               label="Pyro's ss_vae_M2.py, same split")
    ax.set_xticks(at, names, fontsize=8)
    ax.set_ylim(0, 1.15)  # the legend above the bars, not over them
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.axhline(0.1, color="grey", ls=":", lw=1, label="chance")
    ax.set_ylabel("test accuracy of q(label|y)")
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    ax.set_title("M2 on 8000 MNIST images")
    ax = fig.add_subplot(1, 2, 2)
    run = runs.load_run(best["folder"])
    model = run.model(args.backend)
    columns, classes = 8, run.spec.label.classes
    # the same style in every row (z's prior does not read the label: any label draws it)
    z = model.sample_prior(columns, seed=0, labels=np.zeros(columns, dtype=np.int64))
    rows_img = [model.decode_mean(z, labels=np.full(columns, k)) for k in range(classes)]
    side = int(round(np.sqrt(model.data_dim)))
    grid = np.concatenate([np.concatenate([img.reshape(side, side) for img in row], 1)
                           for row in rows_img], 0)
    ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks(side * (np.arange(classes) + 0.5), [f"label {k}" for k in range(classes)],
                  fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"one row per class, the same z per column ({best['labelled']} labels)",
                 fontsize=9)
    save(fig, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    experiments.add_arguments(parser, NAME)
    experiments.add_mnist_argument(parser)
    parser.add_argument("--labels", type=int, nargs="+", default=list(LABELS),
                        help="label counts (default 100 1000)")
    parser.add_argument("--dump-split", metavar="DIR",
                        help="also write each label count's data as DIR/split_<N>.npz")
    parser.add_argument("--peer", metavar="JSON",
                        help="the peer's results, to put beside ours in the table and figure")
    args = parser.parse_args(argv)
    args.mnist = experiments.mnist_folder(args.mnist, parser.prog)
    return args


if __name__ == "__main__":
    main(parse_args())

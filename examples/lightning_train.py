"""Train featstore heads with your own Lightning Trainer, then commit the best as a decoder artifact.

    featstore build --backbone efficientnet_lite0                  # features of the demo dataset
    python examples/lightning_train.py demo.efficientnet_lite0.imagenet
    featstore predict --decoder <the printed ref>             # a contest result on the demo dataset

The data module splits clips as `featstore train` does and holds the features on the trainer's device;
with the same seed and batch size a head fitted here takes the steps a `featstore train` head takes.
"""

from __future__ import annotations

import argparse
import tempfile

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from decoders import HeadConfig
from decoders.lightning import FeatureDataModule, HeadModule
from jobs.train import commit_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("features", help="feature artifact REF, e.g. demo.efficientnet_lite0.imagenet")
    parser.add_argument("--store", default=None, help="featstore store (default: $FEATSTORE_HOME or ~/.featstore)")
    parser.add_argument("--decoder", default="fpn")
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--logs", default=None, help="folder for checkpoints and CSV logs (default: a temporary one)")
    args = parser.parse_args()
    logs = args.logs or tempfile.mkdtemp(prefix="featstore-lightning-")

    data = FeatureDataModule(args.features, store=args.store, batch_size=8, seed=0)
    best: tuple[float, str] | None = None  # best val_iou, and the checkpoint that holds it
    for lr in args.lr:  # one module is one head: a grid is a loop over Trainers, the features load once
        module = HeadModule(HeadConfig(args.decoder, lr=lr), data.channels, data.strides, seed=0)
        checkpoint = ModelCheckpoint(dirpath=f"{logs}/checkpoints/{args.decoder}-lr{lr:g}", monitor="val_iou",
                                     mode="max")
        trainer = pl.Trainer(max_epochs=args.epochs, accelerator="auto", log_every_n_steps=5,
                             logger=CSVLogger(logs, name=f"{args.decoder}-lr{lr:g}"), callbacks=[checkpoint],
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=data)
        score = float(checkpoint.best_model_score)
        print(f"lr {lr:g}: best val_iou {score:.4f} ({checkpoint.best_model_path})")
        if best is None or score > best[0]:
            best = (score, checkpoint.best_model_path)

    assert best is not None
    _, path = best
    module = HeadModule.load_from_checkpoint(path)  # the epoch with the best val_iou
    committed = commit_head(data, module)
    print(f"decoder {committed.ref}: val mean IoU {committed.record.metadata['val_mean_iou']:.4f}, "
          f"{committed.record.metadata['nparams']:,} parameters (backbone + head)")


if __name__ == "__main__":
    main()

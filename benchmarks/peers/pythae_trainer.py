"""bench_peers' trainer for pythae: its `VAE` with this encoder and decoder (784-400-20, ReLU),
trained by its `BaseTrainer`, as pythae's documentation shows for custom networks. Run it with
the Python of a separate environment where pythae is installed (it pins its own dependencies):

    python3.11 -m venv /work/peers/pythae
    /work/peers/pythae/bin/pip install -c constraints.txt pythae   # CPU torch from constraints

pythae has no binarisation of its own (its reproduction table uses a statically binarised
MNIST); here its dataset draws a fresh Bernoulli image each time an example is fetched
(`DynamicallyBinarised`, a `BaseDataset`), i.e. dynamic binarisation through pythae's own data
path (a per-example ``__getitem__`` and its collate function). ``reconstruction_loss = "bce"``
(the Bernoulli likelihood; pythae's default is "mse"); no eval set (pythae then keeps the best
model on the training loss, a deepcopy per improving epoch: part of its loop, timed). A
`TrainingCallback` closes each epoch (``on_epoch_end``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import protocol  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    protocol.add_common_args(parser)
    args = parser.parse_args(argv)

    from importlib.metadata import version

    import torch
    from pythae.data.datasets import BaseDataset, DatasetOutput
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    torch.set_num_threads(args.threads)
    x = torch.from_numpy(protocol.load_images(args.data))

    class Encoder(BaseEncoder):
        def __init__(self):
            BaseEncoder.__init__(self)
            self.fc1 = torch.nn.Linear(784, 400)
            self.loc = torch.nn.Linear(400, 20)
            self.log_var = torch.nn.Linear(400, 20)

        def forward(self, y):
            h = torch.relu(self.fc1(y.reshape(-1, 784)))
            return ModelOutput(embedding=self.loc(h), log_covariance=self.log_var(h))

    class Decoder(BaseDecoder):
        def __init__(self):
            BaseDecoder.__init__(self)
            self.fc1 = torch.nn.Linear(20, 400)
            self.out = torch.nn.Linear(400, 784)

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.out(torch.relu(self.fc1(z)))))

    class DynamicallyBinarised(BaseDataset):
        def __getitem__(self, index):
            return DatasetOutput(data=torch.bernoulli(self.data[index]), labels=self.labels[index])

    clock = protocol.Clock()
    steps_per_epoch = -(-len(x) // args.batch_size)
    recorder = protocol.Recorder(args.out, clock, "exp_half", steps_per_epoch, len(x))

    def snapshot(model):
        enc, dec = model.encoder, model.decoder
        parts = {"enc.W1": enc.fc1.weight, "enc.b1": enc.fc1.bias, "enc.loc.W": enc.loc.weight,
                 "enc.loc.b": enc.loc.bias, "enc.scale.W": enc.log_var.weight,
                 "enc.scale.b": enc.log_var.bias, "dec.W1": dec.fc1.weight,
                 "dec.b1": dec.fc1.bias, "dec.out.W": dec.out.weight, "dec.out.b": dec.out.bias}
        return {k: v.detach().cpu().numpy().copy() for k, v in parts.items()}

    class EpochEnd(TrainingCallback):
        def on_epoch_begin(self, training_config, **kwargs):
            clock.resume()

        def on_epoch_end(self, training_config, **kwargs):
            recorder.epoch_end(lambda: snapshot(kwargs["model"]), stop=True)

    with tempfile.TemporaryDirectory() as scratch:  # pythae writes its final model here
        clock.start()
        model = VAE(VAEConfig(input_dim=(784,), latent_dim=20, reconstruction_loss="bce"),
                    encoder=Encoder(), decoder=Decoder())
        config = BaseTrainerConfig(output_dir=scratch, learning_rate=args.lr,
                                   per_device_train_batch_size=args.batch_size,
                                   num_epochs=args.epochs, optimizer_cls="Adam", no_cuda=True,
                                   seed=args.seed, train_dataloader_num_workers=0)
        dataset = DynamicallyBinarised(x, torch.zeros(len(x)))
        BaseTrainer(model, dataset, training_config=config, callbacks=[EpochEnd()]).train()
    recorder.done(library=f"pythae {version('pythae')}",
                  torch=torch.__version__, threads=torch.get_num_threads(),
                  changed="its VAE with this encoder/decoder; bce; dynamic binarisation in the "
                          "dataset's __getitem__")
    return 0


if __name__ == "__main__":
    sys.exit(main())

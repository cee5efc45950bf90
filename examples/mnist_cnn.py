"""Section 5 of the tutorial, completed: its CNN trained on MNIST, on ptfast's fused kernels.

The tutorial's `Net` (5.3) is used as it is; `ptfast.fuse(Net())` rewrites
its conv -> max_pool2d -> ReLU blocks and its log_softmax into ptfast's fused
operators (same parameters, same state dict keys). Its data section (5.2) is
replaced by ptfast.apps.mnist.data, which reads the same files (downloading them into
--data-root with torchvision when missing) into whole tensors and normalises
each batch exactly as `ToTensor()` + `Normalize((0.5,), (0.5,))` do. The
training section the tutorial leaves out (5.4) follows pytorch/examples' MNIST:
SGD with momentum, nll_loss on the log_softmax output, a test pass each epoch.

    python examples/mnist_cnn.py [--data-root ./data] [--dataset fashion-mnist] [--epochs 1]

For the full command-line trainer (native vs fused, GPU, DDP) see `python -m ptfast.apps.mnist --help`.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

import ptfast
from ptfast.apps.mnist.data import Batches, load


# 5.3, verbatim. The tests hold ptfast.fuse, ptfast.models.MnistCNN and ptfast-mnist to this definition.
class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def train(model, train_loader, optimizer, epoch, max_steps=None):
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        if max_steps is not None and batch_idx >= max_steps:
            break
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        if batch_idx % 200 == 0:
            print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{train_loader.num_samples}]\tLoss: {loss.item():.6f}")


def test(model, test_loader):
    model.eval()
    test_loss, correct = 0.0, 0
    with torch.no_grad():
        for data, target in test_loader:
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            correct += (output.argmax(dim=1) == target).sum().item()
    n = test_loader.num_samples
    print(f"Test set: Average loss: {test_loss / n:.4f}, Accuracy: {correct}/{n} ({100.0 * correct / n:.2f}%)")
    return test_loss / n, correct / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="./data")
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)  # the tutorial's DataLoader batch size
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--max-steps", type=int, default=None, help="training steps per epoch, for a quick try")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # 5.2: the four IDX files, decoded once into uint8 tensors on the training device.
    data = load(args.dataset, args.data_root, device=device)
    train_loader = Batches(data.train_images, data.train_labels, args.batch_size, shuffle=True, seed=args.seed)
    test_loader = Batches(data.test_images, data.test_labels, 1000)

    # 5.3 on ptfast: the tutorial's Net with its blocks fused.
    model = ptfast.fuse(Net()).to(device)
    optimizer = optim.SGD(model.parameters(), lr=args.lr, momentum=0.5)

    # 5.4
    for epoch in range(1, args.epochs + 1):
        train_loader.set_epoch(epoch)
        train(model, train_loader, optimizer, epoch, args.max_steps)
        result = test(model, test_loader)

    # The trained weights load into the tutorial's own Net.
    Net().load_state_dict(model.state_dict())
    return result


if __name__ == "__main__":
    main()

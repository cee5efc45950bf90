"""Section 4.2 of the tutorial: logistic regression, p = sigmoid(Xw + b), for two classes.

Nothing for ptfast to fuse here. One change from the tutorial's
`torch.sigmoid` + `nn.BCELoss`: `nn.BCEWithLogitsLoss` on the logits, the
same loss computed without overflowing for large |z| (BCELoss clamps log(0)
to -100 and its gradient vanishes there). The probabilities are still
`torch.sigmoid(z)`.

    python examples/logistic_regression.py [--samples 1000] [--steps 300]
"""

import argparse

import torch
import torch.nn as nn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    input_size = 2
    # Two Gaussian clouds, labels 0 and 1, as float (BCE's targets).
    y = torch.randint(0, 2, (args.samples, 1)).float()
    X = torch.randn(args.samples, input_size) + (y * 2 - 1) * torch.tensor([1.5, -1.0])

    # 定义逻辑回归模型 / the model: a linear layer; sigmoid gives the probability of class 1
    model = nn.Linear(input_size, 1)
    criterion = nn.BCEWithLogitsLoss()  # == nn.BCELoss()(torch.sigmoid(z), y), stably
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

    for step in range(args.steps):
        z = model(X)  # 前向传播 / forward
        loss = criterion(z, y)  # 计算损失 / loss
        optimizer.zero_grad()  # 反向传播和优化 / backward and update
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        y_pred = torch.sigmoid(model(X))
        accuracy = ((y_pred > 0.5).float() == y).float().mean().item()
    print(f"logistic regression: final BCE {loss.item():.4f}, training accuracy {100 * accuracy:.1f}%")
    return loss.item(), accuracy


if __name__ == "__main__":
    main()

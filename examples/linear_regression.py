"""Section 4.1 of the tutorial: linear regression, y = Xw + b, fitted with nn.Linear and MSELoss.

There is nothing here for ptfast to fuse (one matmul and a squared error):
this is plain PyTorch, with the tutorial's undefined `X`, `y`, `input_size`,
`output_size` and `optimizer` filled in with synthetic data and SGD.

    python examples/linear_regression.py [--samples 1000] [--steps 500]
"""

import argparse

import torch
import torch.nn as nn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    input_size, output_size = 3, 2
    true_w = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])  # (output_size, input_size)
    true_b = torch.tensor([1.0, -0.5])
    X = torch.randn(args.samples, input_size)
    y = X @ true_w.T + true_b + 0.05 * torch.randn(args.samples, output_size)

    # 定义线性回归模型 / the model
    model = nn.Linear(input_size, output_size)
    criterion = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

    for step in range(args.steps):
        y_pred = model(X)  # 前向传播 / forward
        loss = criterion(y_pred, y)  # 计算损失 / loss
        optimizer.zero_grad()  # 反向传播和优化 / backward and update
        loss.backward()
        optimizer.step()

    error = max((model.weight - true_w).abs().max().item(), (model.bias - true_b).abs().max().item())
    print(f"linear regression: final MSE {loss.item():.5f}, largest parameter error {error:.4f}")
    w = ", ".join("[" + ", ".join(f"{v:.3f}" for v in row) + "]" for row in model.weight.tolist())
    b = ", ".join(f"{v:.3f}" for v in model.bias.tolist())
    print(f"  learned w = [{w}], b = [{b}]  (true: w = {true_w.tolist()}, b = {true_b.tolist()})")
    return loss.item(), error


if __name__ == "__main__":
    main()

"""Section 4.3 of the tutorial: softmax regression (multinomial logistic regression), with ptfast.

The tutorial computes `F.softmax(z)` and feeds it to `nn.CrossEntropyLoss`,
which is a mistake: CrossEntropyLoss applies log_softmax itself, so the model
would be trained on log_softmax(softmax(z)), whose gradients are squashed.
The right pairing is log-probabilities with the negative log-likelihood:

    log_probs = ptfast.log_softmax(z, dim=1)     # ptfast's fused, numerically stable kernel
    loss = F.nll_loss(log_probs, y)              # == nn.CrossEntropyLoss()(z, y)

Probabilities, where needed, are `log_probs.exp()`.

    python examples/softmax_regression.py [--samples 1500] [--steps 300]
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import ptfast


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1500)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    input_size, output_size = 4, 3
    # Three Gaussian clouds in 4-D, one per class.
    centres = 2.5 * torch.randn(output_size, input_size)
    y = torch.randint(0, output_size, (args.samples,))
    X = centres[y] + torch.randn(args.samples, input_size)

    # 定义softmax回归模型 / the model
    model = nn.Linear(input_size, output_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

    for step in range(args.steps):
        z = model(X)  # 前向传播 / forward
        log_probs = ptfast.log_softmax(z, dim=1)
        loss = F.nll_loss(log_probs, y)  # 计算损失 / loss: not softmax + CrossEntropyLoss
        optimizer.zero_grad()  # 反向传播和优化 / backward and update
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        z = model(X)
        log_probs = ptfast.log_softmax(z, dim=1)
        accuracy = (log_probs.argmax(dim=1) == y).float().mean().item()
        # The same loss as CrossEntropyLoss on the logits.
        assert torch.allclose(F.nll_loss(log_probs, y), nn.CrossEntropyLoss()(z, y), atol=1e-6)
    print(f"softmax regression: final NLL {loss.item():.4f}, training accuracy {100 * accuracy:.1f}%")
    return loss.item(), accuracy


if __name__ == "__main__":
    main()

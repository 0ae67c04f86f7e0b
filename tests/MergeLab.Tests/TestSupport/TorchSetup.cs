using NUnit.Framework;
using TorchSharp;

namespace MergeLab.Tests;

/// <summary>Fixes torch's thread count for the whole run: the default on 2 cores is noisy.</summary>
[SetUpFixture]
public class TorchSetup
{
    [OneTimeSetUp]
    public void FixThreads() => torch.set_num_threads(2);
}

"""The batched augmentation against the seed's torchvision transforms."""
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from trainkit.data.loaders import SeedAugment, TensorLoader, affine_batch, seed_transforms, PILImageDataset


def test_zero_angle_and_no_zoom_returns_the_input():
    x = torch.rand(8, 1, 28, 28)
    y = affine_batch(x, torch.zeros(8), torch.ones(8))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_rotation_matches_torchvision_rotate():
    x = torch.rand(3, 1, 28, 28)
    angles = [12.5, -7.0, 15.0]
    ours = affine_batch(x, torch.tensor(angles), torch.ones(3))
    for i, angle in enumerate(angles):
        # fill=None pads with zeros, as grid_sample does (a given fill switches torchvision to
        # a mask blend that differs at the border).
        ref = TF.rotate(x[i:i + 1], angle, interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(ours[i:i + 1], ref, atol=1e-4, rtol=0)


def test_zoom_matches_center_crop_and_resize_inside_the_crop():
    x = torch.rand(1, 1, 28, 28)
    ours = affine_batch(x, torch.zeros(1), torch.tensor([28 / 22]))
    ref = TF.resize(TF.center_crop(x, 22), [28, 28], antialias=True)
    # torchvision clamps at the crop's border where we sample the real neighbour pixel,
    # so compare away from the outermost ring.
    torch.testing.assert_close(ours[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-4, rtol=0)


def test_draws_stay_in_range_and_zoom_about_one_in_ten():
    degrees, scales = SeedAugment().draw(20_000, torch.Generator().manual_seed(0))
    assert degrees.abs().max() <= 15.0
    assert degrees.min() < -14.9 and degrees.max() > 14.9          # the whole range is used
    assert abs(degrees.mean().item()) < 0.3                        # symmetric (sd of mean: 0.06)
    zoomed = (scales != 1).float().mean().item()
    assert abs(zoomed - 0.1) < 0.01                                # binomial sd 0.002
    assert torch.allclose(scales.unique(), torch.tensor([1.0, 28 / 22]))


def _torchvision_augmented(images, seed):
    torch.manual_seed(seed)
    dataset = PILImageDataset(images, torch.zeros(len(images), dtype=torch.long), seed_transforms((0.0,), (1.0,), True))
    return torch.stack([dataset[i][0] for i in range(len(images))])


def test_augmented_statistics_agree_with_the_seed_pipeline(mnist):
    images = mnist.train_images[:3000]
    loader = TensorLoader(images, torch.zeros(3000, dtype=torch.long), 3000, mean=(0.0,), std=(1.0,),
                          augment=SeedAugment(), seed=0)
    ours = next(iter(loader))[0]
    ref_a = _torchvision_augmented(images, 1)
    ref_b = _torchvision_augmented(images, 2)
    # Tolerance: two torchvision runs with different seeds differ only by sampling noise.
    # Ours may differ from torchvision by that noise plus a small bias (bilinear resampling
    # at the border of a zoomed crop), so we allow 1.5 times the noise plus 0.005. Measured:
    # noise 0.017 (mean) and 0.028 (std), ours 0.019 and 0.036.
    noise_mean = (ref_a.mean(0) - ref_b.mean(0)).abs().max().item()
    noise_std = (ref_a.std(0) - ref_b.std(0)).abs().max().item()
    assert (ours.mean(0) - ref_a.mean(0)).abs().max().item() < 1.5 * noise_mean + 0.005
    assert (ours.std(0) - ref_a.std(0)).abs().max().item() < 1.5 * noise_std + 0.005
    # Overall brightness and contrast agree closely (measured: 0.0004 and 0.0003 apart). A
    # bilinear rotation would fail here: it blurs, and lowered the spread by 0.014.
    assert abs(ours.mean().item() - ref_a.mean().item()) < 0.003
    assert abs(ours.std().item() - ref_a.std().item()) < 0.003


def test_loader_is_reproducible_and_resumable():
    images = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(100)
    make = lambda: TensorLoader(images, labels, 32, mean=(0.5,), std=(0.5,), shuffle=True,
                                augment=SeedAugment(), seed=3)
    a, b = make(), make()
    first = [y for _, y in a]
    state = a.state_dict()
    second = [x for x, _ in a]
    assert [y.tolist() for _, y in b] == [y.tolist() for y in first]
    b.load_state_dict(state)
    for x, y in zip(second, (x for x, _ in b)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert sorted(torch.cat(first).tolist()) == list(range(100))   # each image once per epoch

import pytest
import torch

from compress.formats.packing import pack_bits, packed_length, unpack_bits


@pytest.mark.parametrize("num_bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 5, 8, 13, 64, 577])
def test_round_trip_is_exact(num_bits, count):
    codes = torch.randint(0, 1 << num_bits, (3, count), dtype=torch.uint8)
    packed = pack_bits(codes, num_bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, packed_length(count, num_bits))
    assert torch.equal(unpack_bits(packed, num_bits, count), codes)


@pytest.mark.parametrize("num_bits", range(1, 9))
def test_layout_matches_slow_reference(num_bits):
    """Code i of each group of eight occupies bits [b*i, b*i+b) of a little-endian word of b bytes."""
    codes = torch.randint(0, 1 << num_bits, (16,), dtype=torch.uint8)
    bits = []
    for code in codes.tolist():
        bits += [(code >> k) & 1 for k in range(num_bits)]
    expected = [sum(bits[8 * j + k] << k for k in range(8)) for j in range(len(bits) // 8)]
    assert pack_bits(codes, num_bits).tolist() == expected


def test_dense_packing_wastes_no_bits():
    assert packed_length(64, 3) == 24
    assert packed_length(9, 2) == 4  # padded to 16 codes only at the end of a row


def test_out_of_range_codes_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="1..8"):
        pack_bits(torch.tensor([0]), 9)


def test_example_in_format_document():
    """docs/FORMAT.md: 3-bit codes 1..7, 0 pack to bytes D1 58 1F."""
    assert pack_bits(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3).tolist() == [0xD1, 0x58, 0x1F]

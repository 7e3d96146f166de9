"""Generation: conditioning maps and crop bank from prepared folders → synthetic WebDataset bundles."""

-- Cluster names from a user vocabulary through the CLIP text tower (core.label.vocabulary_labels):
-- the best-matching names, best first, and the cosine of the best one.
ALTER TABLE clusters ADD COLUMN vocab_label VARCHAR;
ALTER TABLE clusters ADD COLUMN vocab_score DOUBLE;

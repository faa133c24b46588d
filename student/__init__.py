"""Stage two: train a student from a teacher cache (or an online teacher) with the SKD losses."""

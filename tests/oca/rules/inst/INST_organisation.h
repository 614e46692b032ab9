select execute(PRE) from inputFiles where SIG.TEMPLATE == 1 and DO.CATG == "IMG_PREIMAGING"
  group by SETUP as (TPL_A,tpl);
select execute(DARKS) from inputFiles where SIG.TEMPLATE == 1 and DO.CATG == "DARK"
  group by DET.DIT;
